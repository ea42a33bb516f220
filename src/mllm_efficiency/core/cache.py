"""`TrackedCache`: a `DynamicCache` whose layers may store a subset of the tokens seen.

Each `TrackedLayer` records, for its first P0 stored slots, the original (logical) position of every slot
(`prefix_pos`, None = identity) and whether the slot may be attended (`prefix_valid`, None = all). Tokens
appended later by `update()` are contiguous logical positions starting at `tail_start`. So the layer's
logical length is `tail_start + (stored - P0)`, which is what mask sizes and query offsets use, while
`get_seq_length(i)` and `layers[i].keys.shape[-2]` report what layer i physically stores.
Token pruning (FastV) and, later, KV compression both write this bookkeeping; masks are translated from
logical to physical columns by the method's layer hooks.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class TrackedLayer(DynamicLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_pos: torch.Tensor | None = None  # (B, P0) long
        self.prefix_valid: torch.Tensor | None = None  # (B, P0) bool
        self.prefix_len = 0
        self.tail_start = 0
        self.position_shift: torch.Tensor | None = None  # (B,) for renumbered positions
        self._pending: tuple | None = None

    @property
    def is_tracked(self) -> bool:
        return self.prefix_pos is not None or self.prefix_valid is not None

    def set_pending(self, pos, valid, logical_end: int, position_shift=None) -> None:
        """The next `update()` writes the slots whose original positions are `pos` (None = identity)."""
        self._pending = (pos, valid, logical_end, position_shift)

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending is not None:
            pos, valid, logical_end, shift = self._pending
            self._pending = None
            if self.get_seq_length() != 0:
                raise RuntimeError("TrackedLayer: a pruned prefill must start from an empty cache layer")
            self.prefix_pos, self.prefix_valid = pos, valid
            self.prefix_len = key_states.shape[-2]
            self.tail_start = logical_end
            self.position_shift = shift
        return super().update(key_states, value_states, *args, **kwargs)

    def logical_length(self) -> int:
        stored = self.get_seq_length()
        if not self.is_tracked:
            return stored
        return self.tail_start + (stored - self.prefix_len)

    def slot_positions(self, extra: int = 0, batch: int | None = None, device=None) -> torch.Tensor:
        """(B, stored + extra) original positions of every slot, including `extra` tokens about to be appended."""
        stored = self.get_seq_length()
        device = device or (self.keys.device if self.keys is not None else None)
        if self.prefix_pos is None:
            pos = torch.arange(stored + extra, device=device)
            return pos.unsqueeze(0).expand(batch or 1, -1)
        tail = torch.arange(self.tail_start, self.tail_start + stored - self.prefix_len + extra, device=device)
        return torch.cat([self.prefix_pos, tail.unsqueeze(0).expand(self.prefix_pos.shape[0], -1)], dim=1)

    def slot_valid(self, extra: int = 0) -> torch.Tensor | None:
        """(B, stored + extra) bool, or None when every slot is valid."""
        if self.prefix_valid is None:
            return None
        stored = self.get_seq_length()
        tail = self.prefix_valid.new_ones(self.prefix_valid.shape[0], stored - self.prefix_len + extra)
        return torch.cat([self.prefix_valid, tail], dim=1)

    # cache surgery used by generate (beam search, contrastive search, assisted decoding)
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for name in ("prefix_pos", "prefix_valid", "position_shift"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))

    def _select_batch(self, idx: torch.Tensor) -> None:
        for name in ("prefix_pos", "prefix_valid", "position_shift"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx.to(t.device)))

    def crop(self, max_length: int) -> None:
        if self.is_tracked:
            remove = -max_length if max_length < 0 else self.logical_length() - max_length
            if self.get_seq_length() - remove < self.prefix_len:
                raise NotImplementedError("cropping into the pruned prompt part of a TrackedCache is not supported")
        super().crop(max_length)

    def reset(self) -> None:
        super().reset()
        self.prefix_pos = self.prefix_valid = self.position_shift = None
        self.prefix_len = self.tail_start = 0
        self._pending = None


class TrackedCache(DynamicCache):
    """Drop-in `DynamicCache` with per-layer physical/logical bookkeeping (see module docstring)."""

    def __init__(self, config=None, num_layers: int | None = None):
        super().__init__(config=config)
        if config is not None:
            types = getattr(config.get_text_config(decoder=True), "layer_types", None)
            if types and any(t != "full_attention" for t in types):
                raise NotImplementedError("TrackedCache supports full-attention layers only (no sliding window)")
            self.layers = [TrackedLayer() for _ in self.layers]
        elif num_layers is not None:
            self.layers = [TrackedLayer() for _ in range(num_layers)]
            self.layer_class_to_replicate = None
        else:
            self.layer_class_to_replicate = TrackedLayer

    @classmethod
    def adopt(cls, cache: DynamicCache, num_layers: int) -> "TrackedCache":
        """Turn an empty `DynamicCache` into a TrackedCache in place, so a caller that keeps its own cache
        object (a manual decode loop, `generate`) sees what the pruned prefill stored."""
        if cache.get_seq_length() != 0:
            raise ValueError("only an empty DynamicCache can be tracked")
        if any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
            raise NotImplementedError("TrackedCache supports full-attention layers only (no sliding window)")
        cache.__class__ = cls  # same layout (a subclass without new instance state of its own)
        cache.layers[:] = [TrackedLayer() for _ in range(max(num_layers, len(cache.layers)))]
        if cache.layer_class_to_replicate is not None:
            cache.layer_class_to_replicate = TrackedLayer
        return cache

    def _layer(self, layer_idx: int):
        return self.layers[layer_idx] if layer_idx < len(self.layers) else None

    @property
    def logical_length(self) -> int:
        """Tokens seen so far (positions continue from here)."""
        layer = self._layer(0)
        return layer.logical_length() if isinstance(layer, TrackedLayer) else self.get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        layer = self._layer(layer_idx)
        if isinstance(layer, TrackedLayer):
            return layer.logical_length() + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        layer = self._layer(layer_idx)
        if isinstance(layer, TrackedLayer):
            return layer.logical_length()
        return self.get_seq_length(layer_idx)

    def stored_lengths(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.layers]

    def stored_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total
