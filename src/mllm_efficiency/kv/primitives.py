"""Shared pieces of KV-cache compression (docs/kv_methods.md, "Shared primitives").

Shapes: query (B, H, Lq, D) post-RoPE, key (B, Hkv, Lk, D) as stored (never expanded to the query heads);
query head h belongs to KV head h // G with G = H // Hkv (repeat_kv's order). Scores are fp32 and per KV
head: (B, Hkv, Lk). "Slots" are the positions along a layer's stored sequence axis.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

ROW_CHUNK = 512

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------- budgets
def keep_count(length: int, ratio: float | None, budget_tokens: int | None = None) -> int:
    """Tokens kept out of `length`: `min(length, budget_tokens)`, or `max(1, floor(L * (1 - ratio) + 1e-6))`."""
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


# ----------------------------------------------------------------------------------------- attention rows
def row_bias(attention_mask, rows: torch.Tensor, Lq: int, Lk: int, heads: tuple[int, int], device,
             sliding_window: int | None = None) -> torch.Tensor:
    """Additive fp32 bias broadcastable to (B, Hkv, G, r, Lk) for query rows `rows`: causality (the last Lq
    keys are the queries' own slots), the backend's mask (None, 2-D key mask, bool or float 4-D with 1 or H
    heads) and an optional sliding window. -inf where a key is not visible."""
    Hkv, G = heads
    k = torch.arange(Lk, device=device)
    qpos = (Lk - Lq) + rows
    ok = k[None, :] <= qpos[:, None]  # (r, Lk)
    if sliding_window:
        ok = ok & (k[None, :] > qpos[:, None] - sliding_window)
    ok = ok.view(1, 1, 1, *ok.shape)
    bias = torch.zeros((), dtype=torch.float32, device=device)
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # flash-style key padding mask
            ok = ok & attention_mask[:, -Lk:].bool().view(-1, 1, 1, 1, Lk)
        else:
            m = attention_mask[:, :, rows, :Lk]
            m = m.unsqueeze(2) if m.shape[1] == 1 else m.view(m.shape[0], Hkv, G, *m.shape[2:])
            if m.dtype == torch.bool:
                ok = ok & m
            else:  # additive mask: its large negative entries mean "hidden"
                visible = m > torch.finfo(m.dtype).min / 2
                ok = ok & visible
                bias = m.float().masked_fill(~visible, 0.0)
    return (bias + torch.zeros(ok.shape, device=device)).masked_fill(~ok, float("-inf"))


def attention_rows(query, key, attention_mask, rows: torch.Tensor, scaling: float,
                   softcap: float | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """softmax(q_rows k^T * scaling + mask) in fp32, grouped per KV head: (B, Hkv, G, r, Lk).
    Rows that see no key (padding queries) are all zero."""
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    G = H // Hkv
    r = rows.shape[0]
    q = query[:, :, rows, :].float().reshape(B, Hkv, G * r, D)
    logits = torch.matmul(q, key.float().transpose(-1, -2)).view(B, Hkv, G, r, Lk) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + row_bias(attention_mask, rows, Lq, Lk, (Hkv, G), query.device, sliding_window)
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


def group_reduce(x: torch.Tensor, how: str = "mean", dim: int = 2) -> torch.Tensor:
    """Reduce the G query heads of each KV head (dim 2 of (B, Hkv, G, ...))."""
    return x.amax(dim=dim) if how == "max" else x.mean(dim=dim)


def window_scores(query, key, attention_mask, scaling: float, row_weight: torch.Tensor, group: str = "mean",
                  **attn_kw) -> torch.Tensor:
    """Mean attention of the last W query rows (SnapKV's observation window): (B, Hkv, Lk).
    `row_weight` (B, W) is 1 for the rows of each sample's window and 0 otherwise."""
    Lq = query.shape[2]
    W = row_weight.shape[1]
    rows = torch.arange(Lq - W, Lq, device=query.device)
    probs = attention_rows(query, key, attention_mask, rows, scaling, **attn_kw)  # (B, Hkv, G, W, Lk)
    w = row_weight.float()
    summed = (probs * w[:, None, None, :, None]).sum(3) / w.sum(1).clamp_min(1)[:, None, None, None]
    return group_reduce(summed, group)


def column_sums(query, key, attention_mask, scaling: float, row_ok: torch.Tensor | None = None,
                group: str = "mean", chunk: int = ROW_CHUNK, **attn_kw) -> torch.Tensor:
    """s_j = sum over query rows i of A[i, j] (each row sees only keys it may attend), per KV head:
    (B, Hkv, Lk). Computed `chunk` rows at a time (extra memory chunk * Lk * H * 4 bytes).
    `row_ok` (B, Lq) excludes rows (padding queries)."""
    B, H, Lq, _ = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    key = key.float()  # once, not per chunk
    total = torch.zeros(B, Hkv, H // Hkv, Lk, dtype=torch.float32, device=query.device)
    for start in range(0, Lq, chunk):
        rows = torch.arange(start, min(start + chunk, Lq), device=query.device)
        probs = attention_rows(query, key, attention_mask, rows, scaling, **attn_kw)
        if row_ok is not None:
            probs = probs * row_ok[:, rows].float()[:, None, None, :, None]
        total += probs.sum(3)
    return group_reduce(total, group)


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
