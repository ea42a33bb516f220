"""`TrackedCache`: a `DynamicCache` whose layers may store a subset of the tokens seen.

Each `TrackedLayer` records, for its first P0 stored slots, the original (logical) position of every slot
(`prefix_pos`, None = identity) and whether the slot may be attended (`prefix_valid`, None = all). Tokens
appended later by `update()` are contiguous logical positions starting at `tail_start`. So the layer's
logical length is `tail_start + (stored - P0)`, which is what mask sizes and query offsets use, while
`get_seq_length(i)` and `layers[i].keys.shape[-2]` report what layer i physically stores.
Token pruning (FastV) and KV compression both write this bookkeeping; `ModelContext` translates masks from
logical to physical columns.

Per-KV-head layout: after a head-wise KV selection (`select` with an index per KV head) `prefix_pos` and
`prefix_valid` are (B, Hkv, P0): every KV head keeps its own slots, still in ascending original order. Heads
that keep fewer slots than the physical length are padded with `valid=False` filler slots. Appended tokens
are shared by all heads. `slot_positions` / `slot_valid` then return (B, Hkv, S) as well.
Decode-time eviction state lives here too, so it follows the cache through beam reordering and batch
selection: `score` (B, Hkv, S) fp32 accumulators and `budget`, the target slots per sample (host ints).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class TrackedLayer(DynamicLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefix_pos: torch.Tensor | None = None  # (B, P0) or (B, Hkv, P0) long
        self.prefix_valid: torch.Tensor | None = None  # (B, P0) or (B, Hkv, P0) bool
        self.prefix_len = 0
        self.tail_start = 0
        self.position_shift: torch.Tensor | None = None  # (B,) for renumbered positions
        self.score: torch.Tensor | None = None  # (B, Hkv, S) fp32, decode-time eviction scores (S may lag)
        self.budget: tuple[int, ...] | None = None  # slots per sample kept by decode-time eviction
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

    @property
    def per_head(self) -> bool:
        """Slots differ between KV heads (positions/validity are (B, Hkv, P0))."""
        return any(t is not None and t.dim() == 3 for t in (self.prefix_pos, self.prefix_valid))

    def slot_positions(self, extra: int = 0, batch: int | None = None, device=None) -> torch.Tensor:
        """(B, stored + extra) original positions of every slot, including `extra` tokens about to be appended;
        (B, Hkv, stored + extra) for a per-head layer."""
        stored = self.get_seq_length()
        device = device or (self.keys.device if self.keys is not None else None)
        if self.prefix_pos is None:
            pos = torch.arange(stored + extra, device=device)
            pos = pos.unsqueeze(0).expand(batch or 1, -1)
            if self.per_head:
                pos = pos.unsqueeze(1).expand(-1, self.prefix_valid.shape[1], -1)
            return pos
        tail = torch.arange(self.tail_start, self.tail_start + stored - self.prefix_len + extra, device=device)
        prefix = self.prefix_pos
        if self.per_head and prefix.dim() == 2:
            prefix = prefix.unsqueeze(1).expand(-1, self.prefix_valid.shape[1], -1)
        return torch.cat([prefix, tail.expand(*prefix.shape[:-1], -1)], dim=-1)

    def slot_valid(self, extra: int = 0) -> torch.Tensor | None:
        """(B, stored + extra) bool ((B, Hkv, stored + extra) per head), or None when every slot is valid."""
        if self.prefix_valid is None:
            return None
        valid = self.prefix_valid
        if self.per_head and valid.dim() == 2:
            valid = valid.unsqueeze(1).expand(-1, self.prefix_pos.shape[1], -1)
        stored = self.get_seq_length()
        tail = valid.new_ones(*valid.shape[:-1], stored - self.prefix_len + extra)
        return torch.cat([valid, tail], dim=-1)

    def select(self, idx: torch.Tensor, valid: torch.Tensor | bool | None = None) -> None:
        """Keep only the slots `idx` (B, P') (same slots in every KV head) or (B, Hkv, P') (per KV head),
        each row sorted ascending. `valid`: None keeps the selected slots' current validity, True marks every
        kept slot valid, a bool tensor shaped like `idx` gives the validity (False = filler slot). Keys,
        values, positions, validity and `score` stay consistent; the logical length is unchanged, so
        positions and masks of later tokens continue as before."""
        logical = self.logical_length()
        pos = self.slot_positions()
        B, Hkv = self.keys.shape[:2]
        if valid is None:
            old = self.slot_valid()
            valid = None if old is None else _gather_slots(old, idx)
        elif valid is True:
            valid = None
        kv_idx = idx.unsqueeze(1) if idx.dim() == 2 else idx
        kv_idx = kv_idx.expand(B, Hkv, -1).unsqueeze(-1)
        self.keys = self.keys.gather(2, kv_idx.expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, kv_idx.expand(-1, -1, -1, self.values.shape[-1]))
        if self.score is not None:
            missing = pos.shape[-1] - self.score.shape[-1]  # slots appended since the score was updated
            score = torch.nn.functional.pad(self.score, (0, missing)) if missing > 0 else self.score
            self.score = _gather_slots(score, idx)
        new_pos = _gather_slots(pos.expand(B, *pos.shape[1:]), idx)
        if valid is not None and valid.dim() != new_pos.dim():
            valid, new_pos = _per_head(valid, Hkv), _per_head(new_pos, Hkv)
        self.prefix_pos, self.prefix_valid = new_pos, valid
        self.prefix_len = idx.shape[-1]
        self.tail_start = logical

    # cache surgery used by generate (beam search, contrastive search, assisted decoding)
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for name in _BATCHED:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, dim=0))
        if self.budget is not None:
            self.budget = tuple(b for b in self.budget for _ in range(repeats))

    def _select_batch(self, idx: torch.Tensor) -> None:
        for name in _BATCHED:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx.to(t.device)))
        if self.budget is not None:
            self.budget = tuple(self.budget[i] for i in idx.tolist())

    def crop(self, max_length: int) -> None:
        """`max_length` >= 0: keep that many logical tokens (transformers 5.17's meaning); < 0: remove that many
        (the only form 5.24 accepts). Passed on as a removal count, which every pinned version reads alike."""
        remove = -max_length if max_length < 0 else self.logical_length() - max_length
        if remove <= 0 or not self.is_initialized:
            return
        if self.is_tracked and self.get_seq_length() - remove < self.prefix_len:
            raise NotImplementedError("cropping into the pruned prompt part of a TrackedCache is not supported")
        super().crop(-remove)

    def reset(self) -> None:
        # Emptied, not zero-filled: transformers 5.17's `reset` zero-fills and keeps the length (5.24's drops the
        # tensors); either way `update` must then start from an empty layer.
        self.keys = self.values = None
        self.is_initialized = False
        self.prefix_pos = self.prefix_valid = self.position_shift = self.score = self.budget = None
        self.prefix_len = self.tail_start = 0
        self._pending = None


_BATCHED = ("prefix_pos", "prefix_valid", "position_shift", "score")


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(1).expand(-1, heads, -1)


def _gather_slots(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather slots along the last axis; t and idx are each (B, S) or (B, H, S) and broadcast over heads."""
    if t.dim() == idx.dim():
        return t.gather(-1, idx)
    if t.dim() == 2:
        return t.unsqueeze(1).expand(-1, idx.shape[1], -1).gather(-1, idx)
    return t.gather(-1, idx.unsqueeze(1).expand(-1, t.shape[1], -1))


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
