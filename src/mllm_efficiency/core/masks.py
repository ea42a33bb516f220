"""Attention-mask helpers that keep the format of whatever backend built the mask.

Formats: None (backend's causal path), bool 4-D (sdpa: True = attend), float 4-D (eager: additive),
2-D key mask (flash attention: 1 = real key). Every helper returns the same format it was given.
Per-head key layouts (KV compression that keeps different slots per KV head) give key positions/validity of
shape (B, H, Lk) (expanded to the query heads with `expand_kv_heads`); the helpers then return (B, H, Lq, Lk)
4-D masks. A 2-D (flash) mask cannot express per-head keys.
"""
from __future__ import annotations

import torch


def gather_keys(mask: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Select key columns per sample. mask (B, ..., Lk) -> (B, ..., Lk'); cols (B, Lk') or per head (B, H, Lk')
    (a 4-D mask then becomes (B, H, Lq, Lk'))."""
    B = cols.shape[0]
    if mask.shape[0] != B:
        mask = mask.expand(B, *mask.shape[1:])
    if cols.dim() == 3:
        if mask.dim() != 4:
            raise NotImplementedError("per-head KV slots need a 4-D attention mask (sdpa or eager), "
                                      "not a 2-D flash-attention mask")
        H = cols.shape[1]
        mask = mask.expand(B, H, *mask.shape[2:])
        return mask.gather(3, cols[:, :, None, :].expand(B, H, mask.shape[2], cols.shape[2]))
    if mask.dim() == 2:
        return mask.gather(1, cols)
    idx = cols.view(B, 1, 1, -1).expand(B, mask.shape[1], mask.shape[2], cols.shape[1])
    return mask.gather(3, idx)


def expand_kv_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, ...) per-KV-head tensor -> (B, Hkv * groups, ...) per query head (repeat_kv's head order)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def gather_queries(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Select query rows per sample of a 4-D mask. rows (B, Lq')."""
    B = rows.shape[0]
    if mask.shape[0] != B:
        mask = mask.expand(B, *mask.shape[1:])
    idx = rows.view(B, 1, -1, 1).expand(B, mask.shape[1], rows.shape[1], mask.shape[3])
    return mask.gather(2, idx)


def causal_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, Lq, Lk): key visible iff its position <= the query's position. k_pos (B, H, Lk) per head
    gives (B, H, Lq, Lk)."""
    if k_pos.dim() == 3:
        return k_pos[:, :, None, :] <= q_pos[:, None, :, None]
    return (k_pos[:, None, None, :] <= q_pos[:, None, :, None])


def to_backend(allowed: torch.Tensor, like: str, dtype: torch.dtype) -> torch.Tensor:
    """Convert a bool 4-D mask to the backend format `like` ('bool4d' or 'float4d')."""
    if like == "float4d":
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return allowed


def mask_format(mask, inner_impl: str) -> str:
    if mask is None:
        if inner_impl == "eager":
            return "float4d"
        if "flash" in inner_impl:
            return "2d"
        return "bool4d"
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(f"attention mask of type {type(mask).__name__} (e.g. flex BlockMask) is not supported")
    if mask.dim() == 2:
        return "2d"
    return "bool4d" if mask.dtype == torch.bool else "float4d"


def restrict_keys(mask: torch.Tensor, key_ok: torch.Tensor, diag_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Hide keys where `key_ok` (B, Lk) (or per head (B, H, Lk)) is False; rows where `diag_rows` (B, Lq) is True
    keep their own diagonal (so a row never has every key hidden). Diagonal = query i and key i + (Lk - Lq)."""
    if mask.dim() == 2:
        if key_ok.dim() == 3:
            raise NotImplementedError("per-head KV slots need a 4-D attention mask (sdpa or eager)")
        return mask * key_ok.to(mask.dtype) if mask.dtype != torch.bool else mask & key_ok
    Lq, Lk = mask.shape[-2], mask.shape[-1]
    ok = key_ok[:, :, None, :] if key_ok.dim() == 3 else key_ok[:, None, None, :]
    if diag_rows is not None:
        offset = Lk - Lq
        eye = torch.zeros(Lq, Lk, dtype=torch.bool, device=mask.device)
        eye[torch.arange(Lq), torch.arange(Lq) + offset] = True
        ok = ok | (eye[None, None] & diag_rows[:, None, :, None])
    if mask.dtype == torch.bool:
        return mask & ok
    return mask.masked_fill(~ok, torch.finfo(mask.dtype).min)
