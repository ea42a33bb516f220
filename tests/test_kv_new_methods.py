"""TOVA, KeyDiff and Expected Attention (docs/kv_methods.md): config errors, identity at ratio 0 (logits and
cache), kept counts, left-padded batches against single runs, and each selection rule against a reference
re-derived here from the paper / kvpress formulas, in float64 with plain loops, on the unmodified model's
attention (eager), its ordinary `DynamicCache` and its own `q_proj` outputs (no helper of `mllm_efficiency.kv`)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import mllm_efficiency as me
from conftest import CACHE_KW, cache_of, pad_left, text_model_of
from test_kv import LayerMasks, all_kept, evicting_decode, gen, ids_of
from test_kv_reference import eager_attention, keep_of
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.testing import tiny_llama_lm, tiny_qwen2_lm

NEW = ["tova", "keydiff", "expected_attention"]
NL, H, HKV = 4, 4, 2
G = H // HKV
DT = torch.float64
TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def topk(scores, k: int, candidates) -> list[int]:
    """Top k candidates by score, ties to the earlier position."""
    return sorted(sorted(candidates, key=lambda j: (-float(scores[j]), j))[:k])


@pytest.fixture(scope="module")
def eager_llama():
    return tiny_llama_lm(num_layers=NL, attn_implementation="eager")


@pytest.fixture(scope="module")
def eager_qwen2():
    return tiny_qwen2_lm(num_layers=NL, attn_implementation="eager")


# ------------------------------------------------------------------------------------------ config
def test_registered():
    assert set(NEW) <= set(me.available_methods(family="kv"))


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("cfg,match", [
    (dict(ratio=1.0), "ratio"), (dict(ratio=-0.1), "ratio"), (dict(ratio=float("nan")), "ratio"),
    (dict(ratio=True), "ratio"), (dict(ratio=0.5, budget_tokens=4), "mutually exclusive"),
    (dict(decode="accumulate"), "decode"), (dict(evict_every=2), "decode_budget / evict_every"),
])
def test_config_errors(llama_text, method, cfg, match):
    with pytest.raises(ConfigError, match=match):
        me.apply(llama_text, method, **cfg)


@pytest.mark.parametrize("method,cfg,match", [
    ("tova", dict(head_adaptive=1), "head_adaptive"), ("tova", dict(decode="window"), "decode"),
    ("tova", dict(decode="current", decode_budget=0), "decode_budget"),
    ("keydiff", dict(window=-1), "window"), ("keydiff", dict(window=2.0), "window"),
    ("expected_attention", dict(n_future_positions=0), "n_future_positions"),
    ("expected_attention", dict(n_sink=-1), "n_sink"), ("expected_attention", dict(n_sink=True), "n_sink"),
    ("expected_attention", dict(use_covariance=1), "use_covariance"),
    ("expected_attention", dict(use_vnorm="yes"), "use_vnorm"),
    ("expected_attention", dict(epsilon=float("nan")), "epsilon"),
    ("expected_attention", dict(epsilon=float("inf")), "epsilon"),
    ("expected_attention", dict(epsilon=-1e-3), "epsilon"),
    ("expected_attention", dict(decode="current"), "decode"),
])
def test_method_config_errors(llama_text, method, cfg, match):
    with pytest.raises(ConfigError, match=match):
        me.apply(llama_text, method, **cfg)


# ------------------------------------------------------------------------------------------ identity, counts
@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("model_name", ["llama_text", "qwen2"])
def test_ratio_zero_bit_identical_and_kept_counts(request, model_name, method):
    model = request.getfixturevalue(model_name)
    inputs = dict(input_ids=ids_of(40, 2))
    ref = model(**inputs, use_cache=True)
    base_tok, base_logits = gen(model, 4, **inputs)
    with me.apply(model, method, ratio=0.0):
        out = model(**inputs, use_cache=True)
        assert torch.equal(out.logits, ref.logits)
        for a, b in zip(cache_of(out).layers, cache_of(ref).layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        tok, logits = gen(model, 4, **inputs)
        assert torch.equal(tok, base_tok) and torch.equal(logits, base_logits)
    for ratio in (0.5, 0.75, 0.9):
        with me.apply(model, method, ratio=ratio) as h:
            out = model(**inputs, use_cache=True)
            assert torch.equal(out.logits, ref.logits)  # prefill outputs never change
            k = keep_of(40, ratio)
            assert h.stats.kept == [[k]] * NL
            assert all(cache_of(out).layers[i].keys.shape[-2] == k for i in range(NL))
    with me.apply(model, method, budget_tokens=7) as h:
        model(**inputs, use_cache=True)
        assert h.stats.kept == [[7]] * NL
    assert text_model_of(model).config._attn_implementation == "sdpa"
    tok, logits = gen(model, 4, **inputs)  # removed cleanly
    assert torch.equal(tok, base_tok) and torch.equal(logits, base_logits)


# ------------------------------------------------------------------------------------------ batches
BATCH = [("tova", {}), ("tova", dict(decode="current")), ("tova", dict(head_adaptive=True)), ("keydiff", {}),
         ("expected_attention", {}), ("expected_attention", dict(use_covariance=False))]


@pytest.mark.parametrize("method,cfg", BATCH)
@pytest.mark.parametrize("model_name", ["llama_text", "qwen2"])
def test_left_padded_batch_equals_single_runs(request, model_name, method, cfg):
    model = request.getfixturevalue(model_name)
    p1, p2 = ids_of(30, 12), ids_of(40, 13)
    ids, am = pad_left([p1, p2])
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    with me.apply(model, method, ratio=0.6, **cfg) as h:
        cache = cache_of(model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True))
        batch_kept = all_kept(cache, 2)
        assert h.stats.prompt_lengths[NL - 1] == [30, 40]
        assert h.stats.kept[NL - 1] == [keep_of(30, 0.6), keep_of(40, 0.6)]
        tok_b, log_b = gen(model, 3, input_ids=ids, attention_mask=am)
        single_kept = [all_kept(cache_of(model(input_ids=p, use_cache=True))) for p in (p1, p2)]
        single_gen = [gen(model, 3, input_ids=p) for p in (p1, p2)]
    for i in range(NL):
        for hh in range(HKV):
            assert [p - 10 for p in batch_kept[i][0][hh]] == single_kept[0][i][0][hh]
            assert batch_kept[i][1][hh] == single_kept[1][i][0][hh]
    for b in range(2):
        assert torch.equal(tok_b[b], single_gen[b][0][0])
        torch.testing.assert_close(log_b[b], single_gen[b][1][0], atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("head_adaptive", [False, True])
def test_tova_prefill_matches_reference(llama_text, eager_llama, head_adaptive):
    """Paper: score = the last token's attention, averaged over the layer's heads; keep the top `keep`."""
    L, ratio = 36, 0.6
    prompt = dict(input_ids=ids_of(L, 5))
    keep = keep_of(L, ratio)
    with me.apply(llama_text, "tova", ratio=ratio, head_adaptive=head_adaptive):
        kept = all_kept(cache_of(llama_text(**prompt, use_cache=True)))
    A = eager_attention(eager_llama, **prompt)
    for i in range(NL):
        last = A[i][:, L - 1]  # (H, L)
        for h in range(HKV):
            s = last[h * G:(h + 1) * G].mean(0) if head_adaptive else last.mean(0)
            assert kept[i][0][h] == topk(s, keep, range(L)), (i, h)


def test_tova_decode_current_matches_reference():
    """Decode-time TOVA: after every step, the new token's attention (mean over all heads) over the kept
    tokens plus itself; the lowest one is evicted (ties: the later token goes)."""
    model = tiny_llama_lm(num_layers=NL)
    eager = tiny_llama_lm(num_layers=NL, attn_implementation="eager")
    L, ratio, steps = 32, 0.5, 8
    prompt = dict(input_ids=ids_of(L, 11))
    keep = keep_of(L, ratio)
    with me.apply(model, "tova", ratio=ratio, decode="current") as handle:
        tokens, logits, kept_steps = evicting_decode(model, prompt, steps, keep)
        assert handle.stats.decode_evictions == steps * NL
    A = eager_attention(eager, **prompt)
    kept = [topk(A[i][:, L - 1].mean(0), keep, range(L)) for i in range(NL)]
    full = cache_of(eager(**prompt, use_cache=True))
    hooks = LayerMasks(eager)
    try:
        for t, tok in enumerate(tokens):
            S = L + t + 1
            for i in range(NL):
                m = torch.full((1, 1, 1, S), torch.finfo(torch.float32).min)
                m[..., kept[i] + [S - 1]] = 0.0
                hooks.masks[i] = m
            o = eager(input_ids=tok, **{CACHE_KW: full}, position_ids=torch.tensor([[L + t]]),
                      output_attentions=True)
            torch.testing.assert_close(logits[t], o.logits[:, -1], atol=TOL, rtol=0)
            for i in range(NL):
                row = o.attentions[i][0, :, 0].to(DT).mean(0)  # (S,)
                cand = kept[i] + [S - 1]
                drop = min(cand, key=lambda j: (float(row[j]), -j))
                kept[i] = sorted(j for j in cand if j != drop)
                for h in range(HKV):
                    assert kept_steps[t][i][0][h] == kept[i], (t, i, h)
    finally:
        hooks.close()


def test_keydiff_matches_reference(qwen2):
    """Paper / kvpress: anchor = mean of the normalised keys of a head; score = -cos(k, anchor)."""
    L, ratio = 36, 0.7
    prompt = dict(input_ids=ids_of(L, 6))
    keep = keep_of(L, ratio)
    keys = [lay.keys[0].to(DT) for lay in cache_of(qwen2(**prompt, use_cache=True)).layers]
    with me.apply(qwen2, "keydiff", ratio=ratio):
        kept = all_kept(cache_of(qwen2(**prompt, use_cache=True)))
    for i in range(NL):
        for h in range(HKV):
            K = keys[i][h]  # (L, D)
            unit = [K[j] / K[j].norm() for j in range(L)]
            anchor = sum(unit) / L
            s = [-float(K[j] @ anchor / (K[j].norm() * anchor.norm())) for j in range(L)]
            assert kept[i][0][h] == topk(s, keep, range(L)), (i, h)


def expected_attention_reference(model, prompt, ratio, n_future=512, n_sink=4, use_cov=True, use_vnorm=True):
    """kvpress's ExpectedAttention rule written out: query mean / covariance of the layer's pre-RoPE queries
    (first n_sink left out), averaged RoPE matrix over positions L .. L + n_future - 1, per-head
    softmax_j(mu.k_j/sqrt(d) + k_j^T Sigma k_j / (2d)) over the non-sink keys, mean over the KV group, times
    |v_j|; sinks kept, then the top scores."""
    tm = text_model_of(model)
    captured = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda mod, a, out, i=i: captured.__setitem__(i, out[0].to(DT))) for i, layer in enumerate(tm.layers)]
    try:
        cache = cache_of(model(**prompt, use_cache=True))
    finally:
        for h in hooks:
            h.remove()
    L = prompt["input_ids"].shape[1]
    D = cache.layers[0].keys.shape[-1]
    theta = model.config.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=DT) / D)
    Pm = torch.zeros(D, D, dtype=DT)
    Pm[D // 2:, :D // 2] = torch.eye(D // 2, dtype=DT)
    Pm[:D // 2, D // 2:] = -torch.eye(D // 2, dtype=DT)
    Rbar = torch.zeros(D, D, dtype=DT)
    for p in range(L, L + n_future):
        ang = torch.cat([p * inv, p * inv])
        Rbar += torch.diag(torch.cos(ang)) + torch.diag(torch.sin(ang)) @ Pm
    Rbar /= n_future
    keep = keep_of(L, ratio)
    kept = []
    for i in range(NL):
        Q = captured[i].view(L, H, D)[n_sink:]
        K, V = cache.layers[i].keys[0].to(DT), cache.layers[i].values[0].to(DT)
        per_kv = []
        for hk in range(HKV):
            a = torch.zeros(L, dtype=DT)
            for g in range(G):
                q = Q[:, hk * G + g]  # (N, D)
                mu = q.mean(0)
                cov = (q - mu).T @ (q - mu) / q.shape[0]
                mu, cov = Rbar @ mu, Rbar @ cov @ Rbar.T
                z = torch.tensor([float(mu @ K[hk, j]) / math.sqrt(D)
                                  + (float(K[hk, j] @ cov @ K[hk, j]) / (2 * D) if use_cov else 0.0)
                                  for j in range(n_sink, L)], dtype=DT)
                a[n_sink:] += torch.softmax(z, 0) / G
            if use_vnorm:
                a = a * V[hk].norm(dim=-1)
            per_kv.append(sorted(list(range(n_sink)) + topk(a, keep - n_sink, range(n_sink, L))))
        kept.append(per_kv)
    return kept


@pytest.mark.parametrize("model_name,cfg", [("qwen2", {}), ("llama_text", {}),
                                            ("qwen2", dict(use_covariance=False, n_future_positions=16)),
                                            ("llama_text", dict(use_vnorm=False, n_sink=2))])
def test_expected_attention_matches_reference(request, model_name, cfg):
    model = request.getfixturevalue(model_name)
    L, ratio = 40, 0.6
    prompt = dict(input_ids=ids_of(L, 8))
    with me.apply(model, "expected_attention", ratio=ratio, **cfg):
        kept = all_kept(cache_of(model(**prompt, use_cache=True)))
    ref = expected_attention_reference(model, prompt, ratio, n_future=cfg.get("n_future_positions", 512),
                                       n_sink=cfg.get("n_sink", 4), use_cov=cfg.get("use_covariance", True),
                                       use_vnorm=cfg.get("use_vnorm", True))
    for i in range(NL):
        for h in range(HKV):
            assert kept[i][0][h] == ref[i][h], (i, h)


def test_expected_attention_hooks_removed(qwen2):
    before = [len(layer.self_attn.q_proj._forward_hooks) for layer in text_model_of(qwen2).layers]
    h = me.apply(qwen2, "expected_attention", ratio=0.5)
    assert [len(layer.self_attn.q_proj._forward_hooks) for layer in text_model_of(qwen2).layers] == \
        [n + 1 for n in before]
    h.remove()
    h.remove()
    assert [len(layer.self_attn.q_proj._forward_hooks) for layer in text_model_of(qwen2).layers] == before


@pytest.mark.parametrize("method", NEW)
def test_inside_llava_generate(llava, prompt2, method):
    ids = prompt2["input_ids"]
    with me.apply(llava, method, ratio=0.5) as h:
        out = llava.generate(**prompt2, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 3
        L = ids.shape[1]
        assert h.stats.kept[NL - 1] == [keep_of(L, 0.5)]
