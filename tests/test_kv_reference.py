"""KV compression checked against independent references of each method's selection rule.

The references share no code with `mllm_efficiency.kv`: they read the attention probabilities of an
unmodified eager model (`output_attentions=True`, float64 afterwards) and the keys of its ordinary
`DynamicCache`, and apply each rule with plain Python loops (docs/kv_methods.md, "Methods"). The library's kept
set is read from the compressed cache (original position of every valid slot, per KV head).
Prefill logits never change (each layer is compressed after its own attention call), so the eager model's
attention is exactly what the library scored.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import mllm_efficiency as me
from conftest import cache_of
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt, tiny_llama_lm, tiny_llava

DT = torch.float64
NL = 4  # layers of the tiny models
G = 2  # query heads per KV head (4 query heads, 2 KV heads)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # window-size notices of tiny budgets
        yield


# --------------------------------------------------------------------------------------------- helpers
def keep_of(L: int, ratio: float) -> int:
    return max(1, math.floor(L * (1 - ratio) + 1e-6))


def kept_positions(cache, i: int, b: int = 0, h: int = 0) -> list[int]:
    """Original positions of the valid slots of KV head h, sample b, layer i of a compressed cache."""
    layer = cache.layers[i]
    pos = layer.slot_positions(batch=layer.keys.shape[0])
    pos = pos.expand(layer.keys.shape[0], *pos.shape[1:])
    valid = layer.slot_valid()
    p = pos[b, h] if pos.dim() == 3 else pos[b]
    if valid is not None:
        v = valid[b, h] if valid.dim() == 3 else valid[b]
        p = p[v]
    return sorted(p.tolist())


def topk(scores, k: int, candidates) -> list[int]:
    """Top k candidates by score, ties to the earlier position."""
    return sorted(candidates, key=lambda j: (-float(scores[j]), j))[:k]


def group_mean(x: torch.Tensor) -> torch.Tensor:
    """(H, ...) per query head -> (Hkv, ...) mean over each KV head's query heads."""
    return x.view(x.shape[0] // G, G, *x.shape[1:]).mean(1)


def ids_of(L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (1, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models():
    return tiny_llama_lm(num_layers=NL), tiny_llama_lm(num_layers=NL, attn_implementation="eager")


@pytest.fixture(scope="module")
def llava_models():
    return tiny_llava(num_layers=NL), tiny_llava(num_layers=NL, attn_implementation="eager")


def eager_attention(eager, **inputs) -> list[torch.Tensor]:
    out = eager(**inputs, output_attentions=True)
    return [a[0].to(DT) for a in out.attentions]  # per layer (H, L, L)


def compressed(model, method: str, inputs: dict, **cfg):
    with me.apply(model, method, **cfg) as h:
        out = model(**inputs, use_cache=True)
    return cache_of(out), h.stats


# --------------------------------------------------------------------------------------------- rules
def ref_snapkv_scores(A: torch.Tensor, keep: int, window: int, kernel: int = 5):
    """Pooled window-attention scores (Hkv, L - w) and w."""
    L = A.shape[-1]
    w = min(window, keep // 2)
    obs = max(w, 1)
    s = group_mean(A[:, L - obs:, :].mean(1))  # (Hkv, L)
    n = L - w
    pooled = torch.zeros(s.shape[0], n, dtype=DT)
    for h in range(s.shape[0]):
        for p in range(n):
            pooled[h, p] = sum(s[h, q] for q in range(p - kernel // 2, p + kernel // 2 + 1) if 0 <= q < n) / kernel
    return pooled, w


def ref_snapkv(A, keep, window, kernel=5):
    L = A.shape[-1]
    pooled, w = ref_snapkv_scores(A, keep, window, kernel)
    return [sorted(topk(pooled[h], keep - w, range(L - w)) + list(range(L - w, L))) for h in range(pooled.shape[0])]


def ref_h2o(A, keep):
    L = A.shape[-1]
    s = group_mean(A.sum(1))  # column sums over every row (A is causal: zero above the diagonal)
    w = keep // 2
    return [sorted(topk(s[h], keep - w, range(L - w)) + list(range(L - w, L))) for h in range(s.shape[0])]


def ref_pyramid_budgets(n: int, b: int, w: int, L: int, beta: float = 20.0) -> list[int]:
    min_b = b / beta
    max_b = 2 * b - min_b
    if max_b > L - w:
        return [b] * n
    exact = [max_b - l * (max_b - min_b) / (n - 1) for l in range(n)]
    out = [math.floor(x + 1e-9) for x in exact]
    rema = sorted(range(n), key=lambda l: (-(exact[l] - out[l]), l))
    for l in rema[: n * b - sum(out)]:
        out[l] += 1
    return out


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_streamingllm_keeps_sinks_and_recent(models, ratio):
    model, _ = models
    L = 48
    cache, st = compressed(model, "streamingllm", dict(input_ids=ids_of(L)), ratio=ratio)
    keep = keep_of(L, ratio)
    expected = list(range(4)) + list(range(L - (keep - 4), L))
    for i in range(NL):
        assert cache.layers[i].keys.shape == (1, 2, keep, 16)  # stored with the KV-head count
        for h in range(2):
            assert kept_positions(cache, i, 0, h) == expected
    assert st.kept == [[keep]] * NL


@pytest.mark.parametrize("ratio,window", [(0.5, 8), (0.75, 8), (0.5, 32)])
def test_snapkv_matches_reference(models, ratio, window):
    model, eager = models
    L = 64
    inputs = dict(input_ids=ids_of(L, 1))
    A = eager_attention(eager, **inputs)
    cache, _ = compressed(model, "snapkv", inputs, ratio=ratio, window=window)
    keep = keep_of(L, ratio)
    for i in range(NL):
        ref = ref_snapkv(A[i], keep, window)
        for h in range(2):
            assert kept_positions(cache, i, 0, h) == ref[h], (i, h)


def test_snapkv_max_pooling_and_no_pooling(models):
    model, eager = models
    L = 40
    inputs = dict(input_ids=ids_of(L, 2))
    A = eager_attention(eager, **inputs)
    keep = keep_of(L, 0.5)
    cache, _ = compressed(model, "snapkv", inputs, ratio=0.5, window=4, pooling="none")
    for i in range(NL):
        pooled, w = ref_snapkv_scores(A[i], keep, 4, kernel=1)
        for h in range(2):
            ref = sorted(topk(pooled[h], keep - w, range(L - w)) + list(range(L - w, L)))
            assert kept_positions(cache, i, 0, h) == ref
    cache, _ = compressed(model, "snapkv", inputs, ratio=0.5, window=4, pooling="max", kernel_size=3)
    for i in range(NL):
        s = group_mean(A[i][:, L - 4:, :].mean(1))
        for h in range(2):
            mx = [max(s[h, q] for q in range(p - 1, p + 2) if 0 <= q < L - 4) for p in range(L - 4)]
            ref = sorted(topk(mx, keep - 4, range(L - 4)) + list(range(L - 4, L)))
            assert kept_positions(cache, i, 0, h) == ref


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_h2o_matches_reference(models, ratio):
    model, eager = models
    L = 48
    inputs = dict(input_ids=ids_of(L, 3))
    A = eager_attention(eager, **inputs)
    cache, _ = compressed(model, "h2o", inputs, ratio=ratio)
    keep = keep_of(L, ratio)
    for i in range(NL):
        ref = ref_h2o(A[i], keep)
        for h in range(2):
            assert kept_positions(cache, i, 0, h) == ref[h], (i, h)


def test_h2o_column_sums_in_chunks(models, monkeypatch):
    """The all-row column sums are computed 512 rows at a time; a chunk of 7 rows gives the same kept set."""
    from mllm_efficiency.core import attention_rows as primitives

    model, _ = models
    inputs = dict(input_ids=ids_of(40, 4))
    ref, _ = compressed(model, "h2o", inputs, ratio=0.6)
    monkeypatch.setattr(primitives, "ROW_CHUNK", 7)
    monkeypatch.setattr(primitives.column_sums, "__defaults__", (None, "mean", 7))
    cache, _ = compressed(model, "h2o", inputs, ratio=0.6)
    for i in range(NL):
        for h in range(2):
            assert kept_positions(cache, i, 0, h) == kept_positions(ref, i, 0, h)


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_pyramidkv_budgets_and_selection(models, ratio):
    model, eager = models
    L, window = 64, 4
    inputs = dict(input_ids=ids_of(L, 5))
    A = eager_attention(eager, **inputs)
    cache, st = compressed(model, "pyramidkv", inputs, ratio=ratio, window=window)
    keep = keep_of(L, ratio)
    b = keep - window
    budgets = ref_pyramid_budgets(NL, b, window, L)
    assert sum(budgets) == NL * b  # exact
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    for i in range(NL):
        assert cache.layers[i].keys.shape[-2] == budgets[i] + window
        assert st.kept[i] == [budgets[i] + window]
        pooled, w = ref_snapkv_scores(A[i], keep, window)  # SnapKV scores and window of the uniform budget
        for h in range(2):
            ref = sorted(topk(pooled[h], budgets[i], range(L - w)) + list(range(L - w, L)))
            assert kept_positions(cache, i, 0, h) == ref, (i, h)
    assert sum(sum(k) for k in st.kept) == NL * keep


def test_pyramidkv_infeasible_falls_back_to_uniform(models):
    """max_b = 2b - b/20 > L - w: every layer keeps `keep` (this library's fallback; kvpress and KVCache-Factory
    cap first); 'cap' caps max_b instead."""
    model, _ = models
    L = 40
    cache, _ = compressed(model, "pyramidkv", dict(input_ids=ids_of(L, 6)), ratio=0.2, window=4)
    keep = keep_of(L, 0.2)  # 32: b = 28, max_b = 54.6 > 36
    assert [cache.layers[i].keys.shape[-2] for i in range(NL)] == [keep] * NL
    cache, _ = compressed(model, "pyramidkv", dict(input_ids=ids_of(L, 6)), ratio=0.2, window=4, infeasible="cap")
    lens = [cache.layers[i].keys.shape[-2] for i in range(NL)]
    # max_b = 36, min_b = 20 -> 36, 30.67, 25.33, 20 -> largest remainder [36, 31, 25, 20] (+ window 4)
    assert lens == [40, 35, 29, 24] and sum(lens) == NL * keep


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_adakv_matches_reference(models, ratio):
    model, eager = models
    L, window, alpha = 64, 4, 0.2
    inputs = dict(input_ids=ids_of(L, 7))
    A = eager_attention(eager, **inputs)
    cache, st = compressed(model, "adakv", inputs, ratio=ratio, window=window)
    keep = keep_of(L, ratio)
    b = keep - window
    safe = math.floor(alpha * b)
    for i in range(NL):
        pooled, w = ref_snapkv_scores(A[i], keep, window)
        chosen = {h: topk(pooled[h], safe, range(L - w)) for h in range(2)}
        rest = [(h, p) for h in range(2) for p in range(L - w) if p not in chosen[h]]
        rest.sort(key=lambda hp: (-float(pooled[hp[0], hp[1]]), hp[0], hp[1]))
        for h, p in rest[: 2 * (b - safe)]:
            chosen[h].append(p)
        counts = []
        for h in range(2):
            ref = sorted(chosen[h] + list(range(L - w, L)))
            assert kept_positions(cache, i, 0, h) == ref, (i, h)
            counts.append(len(ref))
            assert len(ref) >= safe + w  # the per-head floor
        assert sum(counts) / 2 == keep  # mean over heads equals the budget
        assert cache.layers[i].keys.shape[-2] == max(counts)  # physical = largest head
        assert st.kept_per_head[i] == [counts]


@pytest.mark.parametrize("skip", [(0, 1), ()])
def test_l2norm_keeps_smallest_key_norms(models, skip):
    model, _ = models
    L, ratio = 40, 0.6
    inputs = dict(input_ids=ids_of(L, 8))
    full = cache_of(model(**inputs, use_cache=True))
    cache, _ = compressed(model, "l2norm", inputs, ratio=ratio, skip_layers=skip)
    keep = keep_of(L, ratio)
    for i in range(NL):
        if i in skip:
            assert cache.layers[i].keys.shape[-2] == L
            continue
        norms = full.layers[i].keys[0].to(DT).norm(dim=-1)  # (Hkv, L)
        for h in range(2):
            assert kept_positions(cache, i, 0, h) == sorted(topk(-norms[h], keep, range(L))), (i, h)
            torch.testing.assert_close(cache.layers[i].keys[0, h],
                                       full.layers[i].keys[0, h, kept_positions(cache, i, 0, h)])


def test_random_counts_window_and_seed(models):
    model, _ = models
    L, ratio = 80, 0.5
    inputs = dict(input_ids=ids_of(L, 9))
    keep = keep_of(L, ratio)
    a, _ = compressed(model, "random", inputs, ratio=ratio)
    b, _ = compressed(model, "random", inputs, ratio=ratio)
    c, _ = compressed(model, "random", inputs, ratio=ratio, seed=1)
    w = min(32, keep // 2)
    for i in range(NL):
        for h in range(2):
            kept = kept_positions(a, i, 0, h)
            assert len(kept) == keep and set(range(L - w, L)) <= set(kept)
            assert kept == kept_positions(b, i, 0, h)
    assert any(kept_positions(a, i, 0, h) != kept_positions(c, i, 0, h) for i in range(NL) for h in range(2))


# --------------------------------------------------------------------------------------------- multimodal
def _visual_rows(ids: torch.Tensor):
    vis = (ids[0] == IMAGE_TOKEN).tolist()
    last = max(j for j, v in enumerate(vis) if v)
    return vis, list(range(last + 1, len(vis)))


@pytest.mark.parametrize("ratio,mix", [(0.5, 1.0), (0.8, 1.0), (0.5, 0.2)])
def test_vlcache_matches_reference(llava_models, ratio, mix):
    model, eager = llava_models
    ids, pv = llava_prompt(num_images=2, seed=1, suffix=(12, 13, 14, 15, 16, 17))
    inputs = dict(input_ids=ids, pixel_values=pv)
    L = ids.shape[1]
    A = eager_attention(eager, **inputs)
    cache, st = compressed(model, "vlcache", inputs, ratio=ratio, adaptive_mix=mix)
    _, rows = _visual_rows(ids)
    density = []
    for i in range(NL):
        R = A[i][:, rows, :]  # (H, r, L): causal zeros above the diagonal are not visible entries
        visible = torch.tensor([[j <= r for j in range(L)] for r in rows])
        small = (R < 0.01 * R.amax(-1, keepdim=True)) & visible
        density.append(1 - small.sum().item() / (visible.sum().item() * R.shape[0]))
    kept = 1 - ratio
    for i in range(NL):
        f = kept * 0.9 * NL * density[i] / sum(density)
        f = min(1.0, max(0.009, f))
        f = (1 - mix) * kept * 0.9 + mix * f
        w = math.floor(0.1 * kept * L)
        keep = min(L, w + math.floor(f * L))
        s = group_mean(A[i][:, rows, :].sum(1))
        for h in range(2):
            ref = sorted(topk(s[h], keep - w, range(L - w)) + list(range(L - w, L)))
            assert kept_positions(cache, i, 0, h) == ref, (i, h)
        assert st.budget_fractions[i][0] == pytest.approx(f, abs=1e-9)


def test_vlcache_uniform_variant(llava_models):
    model, _ = llava_models
    ids, pv = llava_prompt(num_images=1)
    L = ids.shape[1]
    cache, _ = compressed(model, "vlcache", dict(input_ids=ids, pixel_values=pv), ratio=0.5, layer_adaptive=False)
    expected = math.floor(0.1 * 0.5 * L) + math.floor(0.45 * L)
    assert [cache.layers[i].keys.shape[-2] for i in range(NL)] == [expected] * NL


def ref_lookm(A, keep, visual):
    L = A.shape[-1]
    s = group_mean(A.sum(1))
    w = math.floor(0.1 * keep)
    out = []
    for h in range(s.shape[0]):
        cands = range(L - w)
        # text first (by score), then visual (by score)
        order = sorted(cands, key=lambda j: (visual[j], -float(s[h, j]), j))
        out.append(sorted(order[: keep - w] + list(range(L - w, L))))
    return out


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_lookm_text_prior_and_average_merge(llava_models, ratio):
    model, eager = llava_models
    ids, pv = llava_prompt(num_images=2, seed=1)
    inputs = dict(input_ids=ids, pixel_values=pv)
    L = ids.shape[1]
    A = eager_attention(eager, **inputs)
    full = cache_of(model(**inputs, use_cache=True))
    visual, _ = _visual_rows(ids)
    keep = keep_of(L, ratio)
    # LOOK-M's averaged merging; the default pivotal merging is checked in test_kv_parity.py
    cache, _ = compressed(model, "lookm", inputs, ratio=ratio, merge="average")
    for i in range(NL):
        ref = ref_lookm(A[i], keep, visual)
        for h in range(2):
            kept = kept_positions(cache, i, 0, h)
            assert kept == ref[h], (i, h)
            k_full = full.layers[i].keys[0, h].to(DT)
            v_full = full.layers[i].values[0, h].to(DT)
            k_ref, v_ref = k_full[kept].clone(), v_full[kept].clone()
            n = torch.ones(len(kept), dtype=DT)
            unit = k_full / k_full.norm(dim=-1, keepdim=True)
            for e in set(range(L)) - set(kept):
                p = int(torch.argmax(unit[kept] @ unit[e]))
                k_ref[p] += k_full[e]
                v_ref[p] += v_full[e]
                n[p] += 1
            torch.testing.assert_close(cache.layers[i].keys[0, h].to(DT), k_ref / n[:, None], atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.layers[i].values[0, h].to(DT), v_ref / n[:, None], atol=1e-5, rtol=0)


def test_lookm_same_modality_merges_within_modality(llava_models):
    model, _ = llava_models
    ids, pv = llava_prompt(num_images=1)
    inputs = dict(input_ids=ids, pixel_values=pv)
    L = ids.shape[1]
    full = cache_of(model(**inputs, use_cache=True))
    visual, _ = _visual_rows(ids)
    cache, _ = compressed(model, "lookm", inputs, ratio=0.5, merge="average", merge_scope="same_modality")
    plain, _ = compressed(model, "lookm", inputs, ratio=0.5, merge="none")
    for i in range(NL):
        for h in range(2):
            kept = kept_positions(cache, i, 0, h)
            assert kept == kept_positions(plain, i, 0, h)
            k_full = full.layers[i].keys[0, h].to(DT)
            unit = k_full / k_full.norm(dim=-1, keepdim=True)
            k_ref, n = k_full[kept].clone(), torch.ones(len(kept), dtype=DT)
            for e in set(range(L)) - set(kept):
                same = [j for j, p in enumerate(kept) if visual[p] == visual[e]]
                if not same:
                    continue
                p = same[int(torch.argmax(unit[[kept[j] for j in same]] @ unit[e]))]
                k_ref[p] += k_full[e]
                n[p] += 1
            torch.testing.assert_close(cache.layers[i].keys[0, h].to(DT), k_ref / n[:, None], atol=1e-5, rtol=0)
            torch.testing.assert_close(plain.layers[i].keys[0, h], full.layers[i].keys[0, h, kept])
