"""Attention rows computed by a method itself from the post-RoPE query and the keys attention saw.

The one place where pruning (FastV, FrameFusion, Focus's SEC) and KV-cache compression (SnapKV, H2O, LOOK-M,
VL-Cache, ...) turn q/k into attention probabilities. Nothing asks the model for attention weights, so the
model stays on SDPA / FlashAttention.

Shapes: query (B, H, Lq, D) post-RoPE; key (B, Hkv, Lk, D) as stored, never expanded to the query heads:
query head h belongs to KV head h // G with G = H // Hkv (repeat_kv's order), and rows are grouped per KV head
(`(B, Hkv, G*r, D) @ k^T`). The last Lq keys are the queries' own slots (causality). Probabilities are fp32.

Masks, as the attention backends receive them:
- None: causal only;
- 2-D (B, Lk') key mask (flash attention; 1 = real key): its last Lk columns are the keys;
- 4-D (B, 1 or H, Lq, Lk') bool (sdpa; True = attend) or additive float (eager; entries at or below
  `finfo.min / 2`, -inf included, mean hidden): its first Lk columns are the keys (transformers' eager and
  sdpa paths slice `[..., :key_len]`: a static cache's mask may be longer than the keys it returned);
  a per-head mask has the H query heads in repeat_kv's order.
Plus the model's attention options: `softcap` (tanh soft-capping of the logits, Gemma-2) and
`sliding_window` (a query sees the last `sliding_window` positions, itself included).
A row that sees no key (a padding query) has all-zero probabilities.
"""
from __future__ import annotations

import torch

ROW_CHUNK = 512


# ----------------------------------------------------------------------------------------- mask bias
def mask_bias(attention_mask, rows: torch.Tensor, Lq: int, Lk: int, heads: tuple[int, int], device,
              sliding_window: int | None = None) -> torch.Tensor:
    """Additive fp32 bias broadcastable to (B, Hkv, G, r, Lk) for query rows `rows`: causality, the backend's
    mask and the sliding window; -inf where a key is not visible (`visible(bias)`)."""
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
                shown = m > torch.finfo(m.dtype).min / 2
                ok = ok & shown
                bias = m.float().masked_fill(~shown, 0.0)
    return (bias + torch.zeros(ok.shape, device=device)).masked_fill(~ok, float("-inf"))


def visible(bias: torch.Tensor) -> torch.Tensor:
    """Bool: which (row, key) pairs a `mask_bias` lets through."""
    return bias > float("-inf")


# ----------------------------------------------------------------------------------------- rows
def attention_rows(query, key, attention_mask, rows: torch.Tensor, scaling: float,
                   softcap: float | None = None, sliding_window: int | None = None) -> torch.Tensor:
    """softmax(q_rows k^T * scaling + mask) in fp32, grouped per KV head: (B, Hkv, G, r, Lk)."""
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    G = H // Hkv
    r = rows.shape[0]
    q = query[:, :, rows, :].float().reshape(B, Hkv, G * r, D)
    logits = torch.matmul(q, key.float().transpose(-1, -2)).view(B, Hkv, G, r, Lk) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + mask_bias(attention_mask, rows, Lq, Lk, (Hkv, G), query.device, sliding_window)
    return torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)


def attention_probs(query, key, attention_mask, rows: torch.Tensor, scaling: float, **attn_kw) -> torch.Tensor:
    """`attention_rows` per query head: (B, H, r, Lk)."""
    probs = attention_rows(query, key, attention_mask, rows, scaling, **attn_kw)
    B, Hkv, G, r, Lk = probs.shape
    return probs.reshape(B, Hkv * G, r, Lk)


def reduce(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    """`max` or `mean` over `dim`."""
    return x.amax(dim=dim) if how == "max" else x.mean(dim=dim)


def group_reduce(x: torch.Tensor, how: str = "mean", dim: int = 2) -> torch.Tensor:
    """Reduce the G query heads of each KV head (dim 2 of (B, Hkv, G, ...))."""
    return reduce(x, how, dim)


# ----------------------------------------------------------------------------------------- per-KV-head scores
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


# ----------------------------------------------------------------------------------------- per-key scores
def key_scores(query, key, attention_mask, scaling: float, scorer: str, head_reduce: str = "mean",
               row_reduce: str = "mean", row_start: torch.Tensor | None = None, first: int | None = None,
               **attn_kw) -> torch.Tensor:
    """Score (B, Lk) of every key, reduced over all H query heads (`head_reduce`).

    last_row: the last query row. all_rows: mean (or max, `row_reduce`) over every row that can see the key,
    in chunks of ROW_CHUNK rows. text_rows: like all_rows restricted to rows >= row_start[b] per sample; its
    first row is `min(row_start)`, read from the device unless the caller knows it (`first`, no host sync).
    """
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    device = query.device
    if scorer == "last_row":
        probs = attention_probs(query, key, attention_mask, torch.arange(Lq - 1, Lq, device=device), scaling,
                                **attn_kw)
        return reduce(probs, head_reduce, 1)[:, 0]
    if scorer == "text_rows":
        if row_start is None:
            raise ValueError("text_rows needs row_start")
        if first is None:
            first = int(row_start.min().clamp(max=Lq - 1))
    else:
        first = 0
    heads = (key.shape[1], H // key.shape[1])
    total = torch.zeros(B, Lk, device=device)
    count = torch.zeros(B, Lk, device=device)
    best = torch.full((B, Lk), float("-inf"), device=device)
    for start in range(first, Lq, ROW_CHUNK):
        rows = torch.arange(start, min(start + ROW_CHUNK, Lq), device=device)
        probs = reduce(attention_probs(query, key, attention_mask, rows, scaling, **attn_kw), head_reduce, 1)
        bias = mask_bias(attention_mask, rows, Lq, Lk, heads, device, attn_kw.get("sliding_window"))
        seen = visible(bias).any(2).any(1).expand(B, -1, -1)  # (B, r, Lk): seen by some head
        if scorer == "text_rows":
            seen = seen & (rows[None, :, None] >= row_start[:, None, None])
        probs = probs * seen
        total += probs.sum(1)
        count += seen.sum(1)
        best = torch.maximum(best, probs.masked_fill(~seen, float("-inf")).amax(1))
    if row_reduce == "max":
        return best.clamp_min(0.0)
    return total / count.clamp_min(1)
