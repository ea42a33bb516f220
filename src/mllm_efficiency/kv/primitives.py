"""Shared pieces of KV-cache compression (docs/kv_methods.md, "Shared primitives"): budgets and slot helpers.

Attention rows and scores from the post-RoPE q/k live in `core.attention_rows` (shared with pruning and video).
Scores are fp32 and per KV head: (B, Hkv, Lk). "Slots" are the positions along a layer's stored sequence axis.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------- budgets
def prompt_keep_count(length: int, ratio: float | None, budget_tokens: int | None = None) -> int:
    """KV compression's keep rule: prompt tokens kept out of `length`, `min(length, budget_tokens)`, or L * (1 - ratio)
    floored, `max(1, floor(L * (1 - ratio) + 1e-6))` (token pruning rounds instead: `flops.visual_keep_count`)."""
    if length <= 0:
        return 0
    if budget_tokens is not None:
        return min(length, budget_tokens)
    return min(length, max(1, math.floor(length * (1.0 - ratio) + 1e-6)))


def window_size(window: int, keep: int, method: str) -> int:
    """The protected recent window inside `keep`: `min(w, keep // 2)`, so a tiny budget still scores tokens."""
    if keep < 2 * window:
        warn_once(f"window-{method}", f"{method}: budget {keep} < 2 * window {window}; using window "
                                      f"{keep // 2} (= keep // 2) where the budget is that small")
        return keep // 2
    return window


# ----------------------------------------------------------------------------------------- slot helpers
def pool(scores: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """1-D pooling over slots (stride 1, padding kernel // 2, length preserved); zero padding as SnapKV."""
    if kind == "none" or kernel <= 1:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    if kind == "avg":
        x = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        x = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    return x[..., :shape[-1]].reshape(shape)


def last_real(real: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of the last `counts[b]` real slots of each row. real (B, [H,] S), counts broadcastable (B[, H])."""
    from_end = real.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the last real slot
    return real & (from_end <= _expand_counts(counts, real))


def first_real(real: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of the first `counts[b]` real slots of each row."""
    return real & (real.long().cumsum(-1) <= _expand_counts(counts, real))


def _expand_counts(counts, like: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(counts, device=like.device)
    while c.dim() < like.dim():
        c = c.unsqueeze(-1)
    return c


def select_slots(score: torch.Tensor, candidate: torch.Tensor, protected: torch.Tensor, keep,
                 kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Protected slots plus the top-scoring candidates, `keep` slots per row (ties to the earlier slot).

    score/candidate/protected: (B, Hc, S) with Hc = 1 (same slots for every KV head) or Hkv.
    keep: (B,) or (B, Hc) counts, protected included; `kmax` >= every count (the physical length).
    Returns idx (B, Hc, kmax) ascending, fillers first, and valid (B, Hc, kmax) (False on fillers).
    """
    shape = torch.broadcast_shapes(score.shape, candidate.shape, protected.shape)
    candidate, protected = candidate.expand(shape), protected.expand(shape)
    s = score.double().expand(shape)  # exact ordering even for offsets like LOOK-M's text prior
    s = s.masked_fill(~candidate, float("-inf")).masked_fill(protected, float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :kmax]
    counts = _expand_counts(keep, order)
    chosen = torch.arange(order.shape[-1], device=order.device) < counts
    chosen = chosen & (candidate | protected).gather(-1, order)
    key = torch.where(chosen, order, torch.full_like(order, -1))
    key = torch.sort(key, dim=-1).values
    if key.shape[-1] < kmax:
        key = F.pad(key, (kmax - key.shape[-1], 0), value=-1)
    return key.clamp_min(0), key >= 0
