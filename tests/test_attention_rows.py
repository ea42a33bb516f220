"""core/attention_rows: the probabilities it computes from post-RoPE q/k equal eager attention's rows,
softmax(Q K^T * scaling [softcapped] + mask), for every mask format a backend hands over."""
from __future__ import annotations

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from mllm_efficiency.core import attention_rows as R

B, H, HKV, LQ, PAST, D = 2, 4, 2, 7, 3, 8
LK = PAST + LQ
SCALING = 0.35


class _Module(torch.nn.Module):
    num_key_value_groups = H // HKV
    head_dim = D


def _qk(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, LQ, D, generator=g), torch.randn(B, HKV, LK, D, generator=g)


def _allowed(window=None, pad=(0, 2), per_head=False):
    """Bool (B, 1 or H, LQ, LK): causal (queries are the last LQ keys), left padding `pad[b]` keys, an
    optional sliding window; per head: head h also hides key h (a mask only a per-head mask can express)."""
    k = torch.arange(LK)
    q = PAST + torch.arange(LQ)
    ok = k[None, :] <= q[:, None]
    if window:
        ok = ok & (k[None, :] > q[:, None] - window)
    ok = ok[None, None].expand(B, 1, LQ, LK).clone()
    for b, p in enumerate(pad):
        ok[b, :, :, :p] = False
    if per_head:
        ok = ok.expand(B, H, LQ, LK).clone()
        for h in range(H):
            ok[:, h, :, h] = False
    return ok


def _additive(ok, neg=None):
    neg = torch.finfo(torch.float32).min if neg is None else neg
    return torch.zeros(ok.shape).masked_fill(~ok, neg)


def _eager(q, k, ok, softcap=None):
    _, weights = eager_attention_forward(_Module(), q, k, k, _additive(ok), scaling=SCALING, softcap=softcap)
    return weights  # (B, H, LQ, LK)


def _compare(got, ref, ok):
    """Rows that see at least one key equal eager's; rows that see none are all zero."""
    seen = ok.expand(B, H, LQ, LK).any(-1)
    assert torch.allclose(got[seen], ref[seen], atol=1e-6, rtol=1e-5)
    assert torch.equal(got[~seen], torch.zeros_like(got[~seen]))


def _probs(q, k, mask, **kw):
    return R.attention_probs(q, k, mask, torch.arange(LQ), SCALING, **kw)


@pytest.mark.parametrize("fmt", ["none", "2d", "bool4d", "float4d", "float4d_inf", "per_head_bool",
                                 "per_head_float", "static_longer"])
def test_probabilities_equal_eager_attention(fmt):
    q, k = _qk()
    pad = (0, 0) if fmt == "none" else (0, 2)
    ok = _allowed(pad=pad, per_head=fmt.startswith("per_head"))
    if fmt == "none":
        mask = None
    elif fmt == "2d":
        mask = torch.ones(B, LK, dtype=torch.long)
        mask[1, :2] = 0
    elif fmt in ("bool4d", "per_head_bool"):
        mask = ok
    elif fmt in ("float4d", "per_head_float"):
        mask = _additive(ok)
    elif fmt == "float4d_inf":
        mask = _additive(ok, float("-inf"))
    else:  # a static cache's mask: more columns than the keys returned; the keys are its first LK columns
        mask = torch.cat([ok, torch.ones(B, 1, LQ, 5, dtype=torch.bool)], dim=-1)
    _compare(_probs(q, k, mask), _eager(q, k, ok), ok)


def test_additive_mask_values_are_added():
    """A float mask's finite entries are biases, not just visibility."""
    q, k = _qk(1)
    ok = _allowed()
    mask = _additive(ok)
    mask = mask + torch.linspace(-2, 1, LK) * ok  # a bias on the visible keys (ALiBi-like)
    _, ref = eager_attention_forward(_Module(), q, k, k, mask, scaling=SCALING)
    _compare(_probs(q, k, mask), ref, ok)


@pytest.mark.parametrize("mask_kind", ["none", "bool4d", "2d"])
def test_sliding_window_and_softcap(mask_kind):
    q, k = _qk(2)
    q = q * 4  # logits large enough for the cap to matter
    window = 3
    ok = _allowed(pad=(0, 0) if mask_kind != "2d" else (0, 1))
    mask = {"none": None, "bool4d": ok, "2d": ok[:, 0, -1].long()}[mask_kind]
    got = _probs(q, k, mask, softcap=2.0, sliding_window=window)
    ok_w = ok & _allowed(window=window, pad=(0, 0))
    _compare(got, _eager(q, k, ok_w, softcap=2.0), ok_w)
    assert not torch.allclose(got, _probs(q, k, mask, sliding_window=window))  # softcap was applied


def test_rows_are_grouped_per_kv_head():
    q, k = _qk(3)
    ok = _allowed()
    rows = torch.tensor([1, 4, 6])
    grouped = R.attention_rows(q, k, ok, rows, SCALING)
    assert grouped.shape == (B, HKV, H // HKV, 3, LK)
    assert torch.allclose(grouped.reshape(B, H, 3, LK), _probs(q, k, ok)[:, :, rows], atol=1e-7)


def test_scores_from_eager_rows():
    q, k = _qk(4)
    ok = _allowed(per_head=True)
    A = _eager(q, k, ok)
    A = A * ok.expand(B, H, LQ, LK).any(-1, keepdim=True)  # eager's fully hidden rows are uniform; ours zero
    seen_any = ok.expand(B, H, LQ, LK).any(1)  # (B, LQ, LK): a row sees the key with some head
    # last row, mean / max over heads
    assert torch.allclose(R.key_scores(q, k, ok, SCALING, "last_row"), A[:, :, -1].mean(1), atol=1e-6)
    assert torch.allclose(R.key_scores(q, k, ok, SCALING, "last_row", "max"), A[:, :, -1].amax(1), atol=1e-6)
    # all rows: mean over the rows that see the key (head-mean first), or the max
    head_mean = A.mean(1)
    ref_mean = (head_mean * seen_any).sum(1) / seen_any.sum(1).clamp_min(1)
    assert torch.allclose(R.key_scores(q, k, ok, SCALING, "all_rows"), ref_mean, atol=1e-6)
    ref_max = head_mean.masked_fill(~seen_any, 0).amax(1)
    assert torch.allclose(R.key_scores(q, k, ok, SCALING, "all_rows", row_reduce="max"), ref_max, atol=1e-6)
    # text rows: rows >= row_start[b]; the first row given by the caller gives the same result
    row_start = torch.tensor([4, 2])
    rows_ok = torch.arange(LQ)[None, :, None] >= row_start[:, None, None]
    ref_text = A.amax(1).masked_fill(~(seen_any & rows_ok), 0).amax(1)
    got = R.key_scores(q, k, ok, SCALING, "text_rows", "max", "max", row_start)
    assert torch.allclose(got, ref_text, atol=1e-6)
    assert torch.equal(R.key_scores(q, k, ok, SCALING, "text_rows", "max", "max", row_start, first=2), got)
    # per KV head: window rows and column sums, mean over each KV head's query heads
    per_kv = A.view(B, HKV, H // HKV, LQ, LK)
    w = torch.tensor([[1, 1, 1], [0, 1, 1]])
    ref_win = (per_kv[:, :, :, -3:] * w[:, None, None, :, None]).sum(3) / w.sum(1)[:, None, None, None]
    assert torch.allclose(R.window_scores(q, k, ok, SCALING, w), ref_win.mean(2), atol=1e-6)
    row_ok = torch.ones(B, LQ, dtype=torch.bool)
    row_ok[1, 0] = False
    ref_cols = (per_kv * row_ok[:, None, None, :, None]).sum(3)
    assert torch.allclose(R.column_sums(q, k, ok, SCALING, row_ok=row_ok, chunk=3), ref_cols.mean(2), atol=1e-6)
    assert torch.allclose(R.column_sums(q, k, ok, SCALING, group="max"), per_kv.sum(3).amax(2), atol=1e-6)


def test_mask_bias_visibility():
    ok = _allowed(window=4, per_head=True)
    bias = R.mask_bias(ok, torch.arange(LQ), LQ, LK, (HKV, H // HKV), "cpu")
    assert torch.equal(R.visible(bias).expand(B, HKV, H // HKV, LQ, LK).reshape(B, H, LQ, LK), ok)
    windowed = R.mask_bias(None, torch.arange(LQ), LQ, LK, (HKV, H // HKV), "cpu", sliding_window=4)
    assert torch.equal(R.visible(windowed)[0, 0, 0], _allowed(window=4, pad=(0, 0))[0, 0])
