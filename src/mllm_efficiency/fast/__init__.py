"""Fast decoding on pruned / compressed caches: static per-layer slot buffers replayed as a CUDA graph."""
from .decode import FastDecoder

__all__ = ["FastDecoder"]
