"""Shared machinery: the attention wrapper, the tracked KV cache, mask helpers."""
