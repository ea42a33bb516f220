"""`BlockMemoryCache`: the Cache object transformers passes around while a memory method is attached.

Its layers store nothing themselves: `update()` returns the call's keys/values unchanged (the memory attention
reads the raw projections) and counts tokens, so `get_seq_length()` is the number of tokens seen, which is what
`generate()` and the position logic need. Each layer holds its `MemoryUnit` (the state in docs/long_context_memory.md,
section 2), created on the layer's first call.
"""
from __future__ import annotations

from transformers.cache_utils import DynamicCache, DynamicLayer


class BlockMemoryLayer(DynamicLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unit = None
        self.seen = 0

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.unit = None
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a block-memory cache cannot be cropped (its blocks summarise the past)")


class BlockMemoryCache(DynamicCache):
    """One `BlockMemoryLayer` per decoder layer; `units()` lists the per-layer memories (None before use)."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.layers = [BlockMemoryLayer() for _ in range(num_layers)]
        self.layer_class_to_replicate = None

    @classmethod
    def adopt(cls, cache, num_layers: int) -> "BlockMemoryCache":
        """Turn an empty cache object into a block-memory cache in place, so a caller holding it (generate)
        keeps using the memory."""
        if cache.get_seq_length() != 0:
            raise ValueError("only an empty cache can become a block-memory cache")
        cache.__class__ = cls
        cache.layers[:] = [BlockMemoryLayer() for _ in range(num_layers)]
        cache.layer_class_to_replicate = None
        return cache

    def units(self) -> list:
        return [layer.unit for layer in self.layers]

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
