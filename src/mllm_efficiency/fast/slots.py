"""Static slot buffers for decoding on caches whose layers store different numbers of tokens.

After a prefill, every layer may hold its own number of slots (FastV keeps fewer tokens from layer K on,
KV methods keep a per-layer or per-KV-head budget, padded batches hold invalid slots). `SlotLayer` copies one
layer into a fixed buffer of `stored + max_new_tokens` slots with an additive key bias (0 = attend,
-inf = padding, filler or not yet written). A decode step writes its key/value at slot
`stored + step`, where `step` is a device tensor shared by all layers, so the same kernels with the same
addresses serve every step: the step can be captured once in a CUDA graph and replayed.
`slot_attention` is the attention function the decode step runs: scores for the few query rows against
every slot, grouped by KV head (no K/V expansion to query heads), plus the layer's bias.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from ..core.attachments import PREFIX

SLOT_ATTENTION = "mllm_eff_slots"  # grouped matmuls + softmax (no K/V expansion)
SLOT_ATTENTION_SDPA = "mllm_eff_slots_sdpa"  # torch SDPA with the bias as its mask
_BIAS_ATTR = PREFIX + "_slot_bias"  # on each attention module while a decode step runs


class SlotLayer(CacheLayerMixin):
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None, capacity: int,
                 step: torch.Tensor):
        super().__init__()
        B, Hkv, stored, D = keys.shape
        self.stored = stored
        capacity = -(-capacity // 8) * 8  # aligned rows for the fused attention kernels; extra slots stay -inf
        self.capacity = capacity
        self.keys = keys.new_zeros(B, Hkv, capacity, D)
        self.values = values.new_zeros(B, Hkv, capacity, values.shape[-1])
        heads = 1 if valid is None or valid.dim() == 2 else valid.shape[1]
        self.bias = torch.full((B, heads, capacity), float("-inf"), device=keys.device, dtype=torch.float32)
        self._base = torch.tensor([stored], device=keys.device, dtype=torch.long)
        self._step = step
        self.is_initialized = True
        self.load(keys, values, valid)

    def layout(self) -> tuple:
        """What must match for `load` to refill this layer with another prefill's contents."""
        return tuple(self.keys.shape), tuple(self.values.shape), tuple(self.bias.shape), self.keys.dtype

    def load(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Copy a prefill's stored slots into the buffers (same stored length and heads as at creation) and mark
        the decode slots unwritten: device copies only, so a captured prefill can end with them."""
        stored, heads = self.stored, self.bias.shape[1]
        B = self.keys.shape[0]
        if keys.shape[-2] != stored or (valid is not None and valid.dim() == 3 and valid.shape[1] != heads):
            raise ValueError(f"slot layout changed: {keys.shape[-2]} stored slots for a buffer of {stored}")
        self.keys[:, :, :stored].copy_(keys)
        self.values[:, :, :stored].copy_(values)
        if valid is None:
            self.bias[:, :, :stored].zero_()
        else:
            valid = valid.unsqueeze(1) if valid.dim() == 2 else valid
            ok = valid.expand(B, heads, stored)
            self.bias[:, :, :stored].copy_(torch.zeros_like(ok, dtype=torch.float32).masked_fill_(~ok, float("-inf")))
        self.bias[:, :, stored:].fill_(float("-inf"))

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers exist from the start
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError(f"slot decoding appends one token per step, got {key_states.shape[-2]}")
        idx = self._base + self._step
        self.keys.index_copy_(2, idx, key_states)
        self.values.index_copy_(2, idx, value_states)
        self.bias.index_fill_(2, idx, 0.0)
        return self.keys, self.values

    def forget_from(self, step: int) -> None:
        """Mark the slots of steps >= `step` unwritten again (used after warm-up runs)."""
        self.bias[:, :, self.stored + step:] = float("-inf")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        return self.stored

    def get_max_length(self) -> int:
        return self.capacity

    @property
    def stored_bytes(self) -> int:
        per_slot = self.keys[:, :, :1].numel() * self.keys.element_size() * 2
        return per_slot * self.stored


def slot_contents(layer, mask2d: torch.Tensor | None, B: int, allow_shift: bool = False):
    """(keys, values, valid) of one prefill cache layer for the slot buffers: `valid` (B, S) or (B, Hkv, S) bool
    marks the slots decoding may attend (False: padding of a left-padded batch, a method's filler slots), None
    when every slot is valid. Device ops only. Renumbered positions are refused unless the caller handles them
    (`allow_shift`: the shift is the same for every layer, see `prefill.ShapePlan`)."""
    from ..core.cache import TrackedLayer

    if isinstance(layer, TrackedLayer) and layer.position_shift is not None and not allow_shift:
        raise NotImplementedError("the slot decoder does not support renumbered positions (FastV positions="
                                  "'renumber'); use the default positions='original'")
    keys, values = layer.keys, layer.values
    tracked = isinstance(layer, TrackedLayer) and layer.is_tracked
    valid = layer.slot_valid() if tracked else None
    if mask2d is not None:  # padding slots of a left-padded batch are never attended
        real = mask2d.bool()
        if tracked:
            pos = layer.slot_positions(batch=B, device=keys.device)
            pos = pos.expand(B, *pos.shape[1:])
            if pos.dim() == 3:
                real = real.unsqueeze(1).expand(-1, pos.shape[1], -1)
            real = real.gather(-1, pos)
        else:
            real = real[:, :keys.shape[-2]]
        if valid is not None and valid.dim() != real.dim():
            valid, real = _per_head(valid), _per_head(real)
        valid = real if valid is None else valid & real
    return keys, values, valid


def _per_head(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(1) if t.dim() == 2 else t


class SlotCache(Cache):
    """The cache a slot decode step passes to the text model. `logical_length` (host int) is what the model
    reads as the number of tokens seen; positions are always passed explicitly."""

    def __init__(self, layers: list[SlotLayer], logical_length: int):
        super().__init__(layers=layers)
        self.logical_length = logical_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].capacity, 0


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query (B, H, q, D) against the layer's slot buffers key/value (B, Hkv, C, D) with the slot bias the
    decoder put on the module; returns (B, q, H, D) like every transformers attention function."""
    bias = getattr(module, _BIAS_ATTR)
    B, H, q, D = query.shape
    Hkv = key.shape[1]
    if scaling is None:
        scaling = getattr(module, "scaling", D ** -0.5)
    grouped = query.reshape(B, Hkv, (H // Hkv) * q, D)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float()
    scores = scores.mul_(scaling).add_(bias.unsqueeze(2))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).reshape(B, H, q, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def slot_attention_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA on the slot buffers, grouped by KV head: the G query heads of each KV head become G query rows
    against that head's keys (no K/V expansion, no `enable_gqa`, which the masked kernels do not take), with
    the slot bias as the mask."""
    bias = getattr(module, _BIAS_ATTR).unsqueeze(2).to(query.dtype)  # (B, 1 | Hkv, 1, C)
    B, H, q, D = query.shape
    Hkv = key.shape[1]
    if scaling is None:
        scaling = getattr(module, "scaling", D ** -0.5)
    grouped = query.reshape(B, Hkv, (H // Hkv) * q, D)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=bias, scale=scaling)
    return out.reshape(B, H, q, value.shape[-1]).transpose(1, 2).contiguous(), None


def slot_attention_sdpa_expand(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with `enable_gqa` and the bias repeated to the query heads (the variant to compare against)."""
    bias = getattr(module, _BIAS_ATTR).unsqueeze(2).to(query.dtype)
    H, Hkv = query.shape[1], key.shape[1]
    if bias.shape[1] != 1 and H != Hkv:
        bias = bias.repeat_interleave(H // Hkv, dim=1)
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling,
                                                           enable_gqa=H != Hkv)
    return out.transpose(1, 2).contiguous(), None


ATTENTION_KINDS = ("matmul", "sdpa", "sdpa-expand")
_KERNELS = {"matmul": (SLOT_ATTENTION, slot_attention), "sdpa": (SLOT_ATTENTION_SDPA, slot_attention_sdpa),
            "sdpa-expand": ("mllm_eff_slots_sdpa_expand", slot_attention_sdpa_expand)}


def default_attention(text_config) -> str:
    """The decode attention measured fastest (benchmarks/e2e): SDPA for multi-head attention, the grouped matmuls
    for grouped-query attention (SDPA's masked kernels measured 6x the bandwidth limit there at 32k)."""
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    return "sdpa" if kv == heads else "matmul"


def register_slot_attention(kind: str = "matmul") -> str:
    # Registered without a mask function: transformers then skips building a mask (the bias is the mask).
    name, fn = _KERNELS[kind]
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, fn)
    return name


def set_layer_bias(attention_modules, layers: list[SlotLayer] | None) -> None:
    for i, module in enumerate(attention_modules):
        if layers is None:
            if hasattr(module, _BIAS_ATTR):
                delattr(module, _BIAS_ATTR)
        else:
            setattr(module, _BIAS_ATTR, layers[i].bias)
