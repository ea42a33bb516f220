"""Attention rows computed by the method itself from the post-RoPE query and the keys attention saw.

Never asks the model for attention weights, so the model stays on SDPA / FlashAttention. Query heads
are grouped per KV head (`(B, Hkv, G*r, D) @ k^T`), so keys are never expanded to the query heads.
"""
from __future__ import annotations

import torch

ROW_CHUNK = 512


def _row_bias(attention_mask, rows: torch.Tensor, Lq: int, Lk: int, B: int, device) -> torch.Tensor:
    """Additive fp32 bias (B, 1, r, Lk) for the given query rows: causality plus the backend's mask."""
    past = Lk - Lq
    k = torch.arange(Lk, device=device)
    causal_ok = k[None, :] <= (past + rows)[:, None]  # (r, Lk)
    ok = causal_ok[None, None].expand(B, 1, -1, -1)
    bias = torch.zeros(ok.shape, dtype=torch.float32, device=device)
    if attention_mask is not None:
        if attention_mask.dim() == 2:  # flash-style key padding mask
            ok = ok & attention_mask[:, None, None, -Lk:].bool()
        else:
            m = attention_mask[:, :, rows, -Lk:]
            if m.dtype == torch.bool:
                ok = ok & m
            else:
                bias = bias + m.float().clamp_min(torch.finfo(torch.float32).min / 2)
    return bias.masked_fill(~ok, float("-inf"))


def attention_probs(query, key, attention_mask, rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention of query rows `rows` over every key they can see: fp32 (B, H, r, Lk)."""
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    G = H // Hkv
    r = rows.shape[0]
    q = query[:, :, rows, :].float().reshape(B, Hkv, G * r, D)
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, Hkv, G*r, Lk)
    logits = logits.view(B, Hkv, G, r, Lk)
    bias = _row_bias(attention_mask, rows, Lq, Lk, B, query.device)  # (B, 1, r, Lk)
    logits = logits + bias[:, :, None]
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0).reshape(B, H, r, Lk)


def _reduce(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    return x.amax(dim=dim) if how == "max" else x.mean(dim=dim)


def key_scores(query, key, attention_mask, scaling: float, scorer: str, head_reduce: str = "mean",
               row_reduce: str = "mean", row_start: torch.Tensor | None = None) -> torch.Tensor:
    """Score (B, Lk) of every key.

    last_row: the last query row. all_rows: mean (or max) over every row that can see the key, in
    chunks of ROW_CHUNK rows. text_rows: like all_rows restricted to rows >= row_start[b] per sample.
    """
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    device = query.device
    if scorer == "last_row":
        probs = attention_probs(query, key, attention_mask, torch.arange(Lq - 1, Lq, device=device), scaling)
        return _reduce(probs, head_reduce, 1)[:, 0]
    first = 0
    if scorer == "text_rows":
        if row_start is None:
            raise ValueError("text_rows needs row_start")
        first = int(row_start.min().clamp(max=Lq - 1))
    total = torch.zeros(B, Lk, device=device)
    count = torch.zeros(B, Lk, device=device)
    best = torch.full((B, Lk), float("-inf"), device=device)
    for start in range(first, Lq, ROW_CHUNK):
        rows = torch.arange(start, min(start + ROW_CHUNK, Lq), device=device)
        probs = _reduce(attention_probs(query, key, attention_mask, rows, scaling), head_reduce, 1)  # (B, r, Lk)
        visible = _row_bias(attention_mask, rows, Lq, Lk, B, device)[:, 0] > float("-inf")  # (B, r, Lk)
        if row_start is not None and scorer == "text_rows":
            visible = visible & (rows[None, :, None] >= row_start[:, None, None])
        probs = probs * visible
        total += probs.sum(1)
        count += visible.sum(1)
        best = torch.maximum(best, probs.masked_fill(~visible, float("-inf")).amax(1))
    if row_reduce == "max":
        return best.clamp_min(0.0)
    return total / count.clamp_min(1)
