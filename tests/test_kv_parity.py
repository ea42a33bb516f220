"""Parity with the authors' code (issue 16): each option checked against the upstream rule, re-derived here
from the papers' and codes' formulas with plain Python loops on the attention probabilities of an unmodified
eager model (float64) and the keys/values of its ordinary cache. Kept sets and stored values are read from the
compressed cache.

Upstream rules re-derived below:
* LOOK-M pivotal merging (LOOK-M `PivotKVCache_LayerWise`, EffiVLM-Bench `LOOK_MCluster`): an evicted entry is
  averaged with its most cosine-similar kept key, then `scatter_reduce(mean, include_self=True)`:
  `k' = (k + sum_i (p_i + k) / 2) / (1 + n)`.
* LOOK-M `hh_ratio` / `recent_ratio`: `max(1, int(L * hh_ratio))` heavy hitters + `max(1, int(L * recent_ratio))`
  recent tokens.
* KVCache-Factory `PyramidKVCluster`: `min = b // beta`, `max = 2b - min`, cap at `L - w`,
  `steps = (max - min) // (n - 1)`, layer l keeps `max - l * steps`, uniform `b` when `L < 2b`.
* Ada-KV (FFY0/AdaKV, KVCache-Factory `AdaKVCluster`): `c_h` = head h's count in the global top `Hkv * b`,
  capacity `round((1 - alpha) * c_h + int(alpha * b))`.
* EffiVLM-Bench `head_adaptive=False`: scores summed over the KV heads, one kept set for all heads.
* VL-Cache `different_window_per_layer` (window = 10% of each layer's own budget, budget inside).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import cache_of

import mllm_efficiency as me
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt, tiny_llama_lm, tiny_llava

DT = torch.float64
NL = 4  # layers
HKV, G = 2, 2  # KV heads, query heads per KV head


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture(scope="module")
def models():
    return tiny_llama_lm(num_layers=NL), tiny_llama_lm(num_layers=NL, attn_implementation="eager")


@pytest.fixture(scope="module")
def llava_models():
    return tiny_llava(num_layers=NL), tiny_llava(num_layers=NL, attn_implementation="eager")


# --------------------------------------------------------------------------------------------- helpers
def ids_of(L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (1, L), generator=torch.Generator().manual_seed(seed))


def keep_of(L: int, ratio: float) -> int:
    return max(1, math.floor(L * (1 - ratio) + 1e-6))


def reference_run(eager, inputs):
    """Per layer: attention probabilities (H, L, L) and the full keys / values (Hkv, L, D), float64."""
    out = eager(**inputs, output_attentions=True, use_cache=True)
    cache = cache_of(out)
    A = [a[0].to(DT) for a in out.attentions]
    K = [cache.layers[i].keys[0].to(DT) for i in range(NL)]
    V = [cache.layers[i].values[0].to(DT) for i in range(NL)]
    return A, K, V


def compressed(model, method: str, inputs: dict, **cfg):
    with me.apply(model, method, **cfg) as h:
        out = model(**inputs, use_cache=True)
    return cache_of(out), h.stats


def kept_positions(cache, i: int, h: int) -> list[int]:
    layer = cache.layers[i]
    pos = layer.slot_positions(batch=1)
    pos = pos.expand(1, *pos.shape[1:])
    valid = layer.slot_valid()
    p = pos[0, h] if pos.dim() == 3 else pos[0]
    if valid is not None:
        p = p[valid[0, h] if valid.dim() == 3 else valid[0]]
    return p.tolist()  # slot order (ascending positions)


def stored(cache, i: int, h: int):
    """Keys and values of the valid slots of head h, float64."""
    layer = cache.layers[i]
    valid = layer.slot_valid()
    k, v = layer.keys[0, h].to(DT), layer.values[0, h].to(DT)
    if valid is not None:
        m = valid[0, h] if valid.dim() == 3 else valid[0]
        k, v = k[m], v[m]
    return k, v


def topk(scores, k: int, candidates) -> list[int]:
    return sorted(candidates, key=lambda j: (-float(scores[j]), j))[:k]


def group_mean(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0] // G, G, *x.shape[1:]).mean(1)


def avg_pool(s, n: int, kernel: int = 5) -> list[float]:
    """SnapKV's avg_pool1d(padding=kernel // 2, count_include_pad) over the first n scores."""
    return [sum(float(s[q]) for q in range(p - kernel // 2, p + kernel // 2 + 1) if 0 <= q < n) / kernel
            for p in range(n)]


def snap_window_scores(A, keep: int, window: int):
    """Mean window attention, group mean over query heads: (Hkv, L), and the effective window."""
    L = A.shape[-1]
    w = min(window, keep // 2)
    return group_mean(A[:, L - max(w, 1):, :].mean(1)), w


def ref_merge(K, V, kept: list[int], how: str, visual=None):
    """LOOK-M merging of one head: every evicted slot joins its most cosine-similar kept key (first maximum);
    'pivot': k' = (k + sum (p_i + k) / 2) / (1 + n); 'average': k' = (k + sum p_i) / (1 + n)."""
    L = K.shape[0]
    unit = K / K.norm(dim=-1, keepdim=True)
    joined = {p: [] for p in kept}
    for e in range(L):
        if e in joined:
            continue
        cands = [p for p in kept if visual is None or visual[p] == visual[e]]
        if not cands:
            continue
        sims = [float(unit[p] @ unit[e]) for p in cands]
        joined[cands[max(range(len(cands)), key=lambda j: (sims[j], -j))]].append(e)
    out_k, out_v = [], []
    for p in kept:
        es, n = joined[p], len(joined[p])
        if how == "pivot":
            out_k.append((K[p] + sum(((K[e] + K[p]) / 2 for e in es), torch.zeros_like(K[p]))) / (1 + n))
            out_v.append((V[p] + sum(((V[e] + V[p]) / 2 for e in es), torch.zeros_like(V[p]))) / (1 + n))
        else:
            out_k.append((K[p] + sum((K[e] for e in es), torch.zeros_like(K[p]))) / (1 + n))
            out_v.append((V[p] + sum((V[e] for e in es), torch.zeros_like(V[p]))) / (1 + n))
    return torch.stack(out_k), torch.stack(out_v)


def assert_stored(cache, i, h, k_ref, v_ref):
    k, v = stored(cache, i, h)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=0)


def visual_of(ids) -> list[bool]:
    return (ids[0] == IMAGE_TOKEN).tolist()


def ref_lookm_kept(A, visual, hh: int, recent: int) -> list[list[int]]:
    """LOOK-M: column sums (group mean), text before visual, top `hh` outside the recent `recent`."""
    L = A.shape[-1]
    s = group_mean(A.sum(1))
    out = []
    for h in range(HKV):
        order = sorted(range(L - recent), key=lambda j: (visual[j], -float(s[h, j]), j))
        out.append(sorted(order[:hh] + list(range(L - recent, L))))
    return out


# --------------------------------------------------------------------------------------------- LOOK-M
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_lookm_pivot_merge_matches_authors(llava_models, ratio):
    model, eager = llava_models
    ids, pv = llava_prompt(num_images=2, seed=1)
    inputs = dict(input_ids=ids, pixel_values=pv)
    L, visual = ids.shape[1], visual_of(ids)
    A, K, V = reference_run(eager, inputs)
    keep = keep_of(L, ratio)
    recent = math.floor(0.1 * keep)
    cache, _ = compressed(model, "lookm", inputs, ratio=ratio)  # merge="pivot" is the default
    moved = 0
    for i in range(NL):
        ref = ref_lookm_kept(A[i], visual, keep - recent, recent)
        for h in range(HKV):
            assert kept_positions(cache, i, h) == ref[h], (i, h)
            k_ref, v_ref = ref_merge(K[i][h], V[i][h], ref[h], "pivot")
            assert_stored(cache, i, h, k_ref, v_ref)
            k_avg, _ = ref_merge(K[i][h], V[i][h], ref[h], "average")
            moved += int((k_avg - k_ref).abs().amax() > 1e-3)
    assert moved  # the two formulas differ on these tensors: the test tells them apart


def test_lookm_same_modality_is_pivotal(llava_models):
    """EffiVLM-Bench's update_kv_only_merge_visual: pivotal merging within each modality."""
    model, eager = llava_models
    ids, pv = llava_prompt(num_images=1)
    inputs = dict(input_ids=ids, pixel_values=pv)
    L, visual = ids.shape[1], visual_of(ids)
    A, K, V = reference_run(eager, inputs)
    keep = keep_of(L, 0.5)
    recent = math.floor(0.1 * keep)
    for cfg in (dict(merge="same_modality"), dict(merge="pivot", merge_scope="same_modality")):
        cache, _ = compressed(model, "lookm", inputs, ratio=0.5, **cfg)
        for i in range(NL):
            ref = ref_lookm_kept(A[i], visual, keep - recent, recent)
            for h in range(HKV):
                assert kept_positions(cache, i, h) == ref[h]
                assert_stored(cache, i, h, *ref_merge(K[i][h], V[i][h], ref[h], "pivot", visual))


@pytest.mark.parametrize("hh,rec", [(0.3, 0.1), (0.05, 0.2)])
def test_lookm_hh_ratio_recent_ratio(llava_models, hh, rec):
    model, eager = llava_models
    ids, pv = llava_prompt(num_images=2, seed=2)
    inputs = dict(input_ids=ids, pixel_values=pv)
    L, visual = ids.shape[1], visual_of(ids)
    A, K, V = reference_run(eager, inputs)
    n_hh, n_rec = max(1, int(L * hh)), max(1, int(L * rec))
    cache, st = compressed(model, "lookm", inputs, hh_ratio=hh, recent_ratio=rec)
    for i in range(NL):
        ref = ref_lookm_kept(A[i], visual, n_hh, n_rec)
        assert st.kept[i] == [n_hh + n_rec]
        for h in range(HKV):
            assert kept_positions(cache, i, h) == ref[h], (i, h)
            assert_stored(cache, i, h, *ref_merge(K[i][h], V[i][h], ref[h], "pivot"))


# --------------------------------------------------------------------------------------------- PyramidKV
def ref_kvcf_budgets(n: int, b: int, w: int, L: int, beta: int = 20) -> list[int]:
    """KVCache-Factory PyramidKVCluster.update_kv, written out (scored tokens per layer)."""
    if L < 2 * b:
        return [b] * n
    lo = b // beta
    hi = 2 * b - lo
    if hi >= L - w:
        hi = L - w
        lo = 2 * b - hi
    step = (hi - lo) // (n - 1)
    return [hi - l * step for l in range(n)]


@pytest.mark.parametrize("L,ratio,expected", [(64, 0.5, [55, 37, 19, 1]),  # pyramid, integer steps
                                              (64, 0.44, [60, 41, 22, 3]),  # max capped at L - w
                                              (40, 0.2, [28] * 4)])  # L < 2b: uniform
def test_pyramidkv_kvcache_factory_schedule(models, L, ratio, expected):
    model, eager = models
    window = 4
    inputs = dict(input_ids=ids_of(L, 11))
    A, K, V = reference_run(eager, inputs)
    keep = keep_of(L, ratio)
    budgets = ref_kvcf_budgets(NL, keep - window, window, L)
    assert budgets == expected
    cache, st = compressed(model, "pyramidkv", inputs, ratio=ratio, window=window, schedule="kvcache_factory")
    for i in range(NL):
        assert st.kept[i] == [budgets[i] + window]
        s, w = snap_window_scores(A[i], keep, window)
        for h in range(HKV):
            pooled = avg_pool(s[h], L - w)
            ref = sorted(topk(pooled, budgets[i], range(L - w)) + list(range(L - w, L)))
            assert kept_positions(cache, i, h) == ref, (i, h)
            assert_stored(cache, i, h, K[i][h][ref], V[i][h][ref])


# --------------------------------------------------------------------------------------------- AdaKV
@pytest.mark.parametrize("ratio,alpha", [(0.5, 0.2), (0.75, 0.5), (0.6, 0.0)])
def test_adakv_original_allocation(models, ratio, alpha):
    model, eager = models
    L, window = 64, 4
    inputs = dict(input_ids=ids_of(L, 12))
    A, K, V = reference_run(eager, inputs)
    keep = keep_of(L, ratio)
    b = keep - window
    cache, st = compressed(model, "adakv", inputs, ratio=ratio, window=window, alpha=alpha, allocation="adakv")
    for i in range(NL):
        s, w = snap_window_scores(A[i], keep, window)
        pooled = [avg_pool(s[h], L - w) for h in range(HKV)]
        flat = sorted(((h, p) for h in range(HKV) for p in range(L - w)),
                      key=lambda hp: (-pooled[hp[0]][hp[1]], hp[0], hp[1]))[:HKV * b]
        counts = [sum(1 for hh, _ in flat if hh == h) for h in range(HKV)]
        caps = [round((1 - alpha) * c + int(alpha * b)) for c in counts]  # round half to even, as torch.round
        for h in range(HKV):
            ref = sorted(topk(pooled[h], caps[h], range(L - w)) + list(range(L - w, L)))
            assert kept_positions(cache, i, h) == ref, (i, h, counts)
            assert_stored(cache, i, h, K[i][h][ref], V[i][h][ref])
        assert st.kept_per_head[i] == [[c + w for c in caps]]


# --------------------------------------------------------------------------------------------- head_adaptive=False
def _shared(cache, i):
    pos = [kept_positions(cache, i, h) for h in range(HKV)]
    assert all(p == pos[0] for p in pos)  # one kept set for all KV heads
    return pos[0]


def test_head_adaptive_false_snapkv_pyramidkv_h2o(models):
    model, eager = models
    L, window, ratio = 64, 4, 0.6
    inputs = dict(input_ids=ids_of(L, 13))
    A, K, V = reference_run(eager, inputs)
    keep = keep_of(L, ratio)
    snap, _ = compressed(model, "snapkv", inputs, ratio=ratio, window=window, head_adaptive=False)
    pyr, _ = compressed(model, "pyramidkv", inputs, ratio=ratio, window=window, head_adaptive=False,
                        schedule="kvcache_factory")
    h2o, _ = compressed(model, "h2o", inputs, ratio=ratio, head_adaptive=False)
    budgets = ref_kvcf_budgets(NL, keep - window, window, L)
    for i in range(NL):
        s, w = snap_window_scores(A[i], keep, window)
        summed = avg_pool(s.sum(0), L - w)  # EffiVLM-Bench: attention summed over the heads, then pooled
        ref = sorted(topk(summed, keep - w, range(L - w)) + list(range(L - w, L)))
        assert _shared(snap, i) == ref
        ref = sorted(topk(summed, budgets[i], range(L - w)) + list(range(L - w, L)))
        assert _shared(pyr, i) == ref
        for h in range(HKV):
            assert_stored(pyr, i, h, K[i][h][ref], V[i][h][ref])
        col = group_mean(A[i].sum(1)).sum(0)
        r = math.floor(keep * 0.5)
        ref = sorted(topk(col, keep - r, range(L - r)) + list(range(L - r, L)))
        assert _shared(h2o, i) == ref
        for h in range(HKV):
            assert_stored(h2o, i, h, K[i][h][ref], V[i][h][ref])


def test_h2o_accumulate_with_shared_heads_generates(models):
    model, _ = models
    with me.apply(model, "h2o", ratio=0.5, head_adaptive=False, decode="accumulate") as h:
        out = model.generate(input_ids=ids_of(40, 14), max_new_tokens=6, do_sample=False,
                             return_dict_in_generate=True)
    assert out.sequences.shape[1] == 46 and h.stats.decode_evictions > 0
    cache = cache_of(out)
    for i in range(NL):
        _shared(cache, i)
        assert len(kept_positions(cache, i, 0)) == keep_of(40, 0.5)


# --------------------------------------------------------------------------------------------- VL-Cache
def vl_reference(A, ids, threshold: float):
    """Post-vision rows, per-layer density (share of visible entries >= threshold * row max) and per-head row
    sums (group mean)."""
    L = ids.shape[1]
    vis = visual_of(ids)
    last = max(j for j, v in enumerate(vis) if v)
    rows = list(range(last + 1, L))
    density, scores = [], []
    for a in A:
        R = a[:, rows, :]
        visible = torch.tensor([[j <= r for j in range(L)] for r in rows])
        small = (R < threshold * R.amax(-1, keepdim=True)) & visible
        density.append(1 - small.sum().item() / (visible.sum().item() * R.shape[0]))
        scores.append(group_mean(R.sum(1)))
    return density, scores


def test_vlcache_different_window_per_layer_and_shared_heads(llava_models):
    model, eager = llava_models
    ids, pv = llava_prompt(num_images=2, seed=1, suffix=(12, 13, 14, 15, 16, 17))
    inputs = dict(input_ids=ids, pixel_values=pv)
    L = ids.shape[1]
    A, K, V = reference_run(eager, inputs)
    # the tiny model's attention is flat: a high threshold makes the layers' densities differ
    thr = 0.9
    density, scores = vl_reference(A, ids, thr)
    assert len(set(density)) > 1
    ratio = 0.6
    kept = 1 - ratio
    cache, st = compressed(model, "vlcache", inputs, ratio=ratio, different_window_per_layer=True,
                           sparsity_threshold=thr)
    shared, _ = compressed(model, "vlcache", inputs, ratio=ratio, head_adaptive=False, sparsity_threshold=thr)
    sizes = []
    for i in range(NL):
        # window inside each layer's own budget: f_l = (1 - r) n d_l / sum d, clamped to [0.01, 1]
        f = min(1.0, max(0.01, kept * NL * density[i] / sum(density)))
        assert st.budget_fractions[i][0] == pytest.approx(f, abs=1e-6)  # fp32 counts
        k, w = min(L, math.floor(f * L)), math.floor(0.1 * f * L)
        sizes.append(k)
        for h in range(HKV):
            ref = sorted(topk(scores[i][h], k - w, range(L - w)) + list(range(L - w, L)))
            assert kept_positions(cache, i, h) == ref, (i, h)
            assert_stored(cache, i, h, K[i][h][ref], V[i][h][ref])
        # head_adaptive=False with the default budgets: scores summed over the heads
        f = min(1.0, max(0.009, kept * 0.9 * NL * density[i] / sum(density)))
        w = math.floor(0.1 * kept * L)
        k = min(L, w + math.floor(f * L))
        ref = sorted(topk(scores[i].sum(0), k - w, range(L - w)) + list(range(L - w, L)))
        assert _shared(shared, i) == ref
    assert len(set(sizes)) > 1  # windows and budgets differ by layer


# --------------------------------------------------------------------------------------------- merge option
@pytest.mark.parametrize("method,cfg", [("h2o", {}), ("snapkv", dict(window=4)), ("pyramidkv", dict(window=4)),
                                        ("snapkv", dict(window=4, head_adaptive=False)),
                                        ("adakv", dict(window=4))])  # ragged heads: filler slots
@pytest.mark.parametrize("how", ["pivot", "average"])
def test_merge_option_follows_lookm_formula(models, method, cfg, how):
    """Per KV head, every slot that head evicted (even if another head kept it) joins that head's most similar
    kept key (selected or window); keys and values move together."""
    model, eager = models
    L = 48
    inputs = dict(input_ids=ids_of(L, 15))
    _, K, V = reference_run(eager, inputs)
    plain, _ = compressed(model, method, inputs, ratio=0.6, **cfg)
    merged, _ = compressed(model, method, inputs, ratio=0.6, merge=how, **cfg)
    differs = False
    for i in range(NL):
        for h in range(HKV):
            kept = kept_positions(plain, i, h)
            assert kept_positions(merged, i, h) == kept  # merging never changes the kept set
            k_ref, v_ref = ref_merge(K[i][h], V[i][h], kept, how)
            assert_stored(merged, i, h, k_ref, v_ref)
            differs |= bool((k_ref - K[i][h][kept]).abs().amax() > 1e-3)
    assert differs


def test_merge_option_vlcache(llava_models):
    model, eager = llava_models
    ids, pv = llava_prompt(num_images=1, seed=3)
    inputs = dict(input_ids=ids, pixel_values=pv)
    _, K, V = reference_run(eager, inputs)
    plain, _ = compressed(model, "vlcache", inputs, ratio=0.5)
    merged, _ = compressed(model, "vlcache", inputs, ratio=0.5, merge="pivot")
    for i in range(NL):
        for h in range(HKV):
            kept = kept_positions(plain, i, h)
            assert kept_positions(merged, i, h) == kept
            assert_stored(merged, i, h, *ref_merge(K[i][h], V[i][h], kept, "pivot"))


@pytest.mark.parametrize("method,cfg", [("snapkv", dict(merge="pivot", head_adaptive=False)),
                                        ("h2o", dict(merge="average", head_adaptive=False)),
                                        ("pyramidkv", dict(schedule="kvcache_factory", merge="pivot")),
                                        ("adakv", dict(allocation="adakv")),
                                        ("lookm", dict(hh_ratio=0.5, recent_ratio=0.5))])
def test_ratio_zero_and_full_budget_leave_the_model_untouched(models, method, cfg):
    model, _ = models
    inputs = dict(input_ids=ids_of(32, 16))
    ref = model(**inputs, use_cache=True)
    if method != "lookm":
        cfg = dict(cfg, ratio=0.0)
    with me.apply(model, method, **cfg):
        out = model(**inputs, use_cache=True)
    assert torch.equal(out.logits, ref.logits)
    for i in range(NL):
        assert torch.equal(cache_of(out).layers[i].keys, cache_of(ref).layers[i].keys)
        assert torch.equal(cache_of(out).layers[i].values, cache_of(ref).layers[i].values)


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("method,cfg,match", [
    ("adakv", dict(beta=10.0), r"beta.*only apply with base='pyramidkv'"),
    ("adakv", dict(infeasible="cap"), r"infeasible.*only apply with base='pyramidkv'"),
    ("adakv", dict(schedule="kvcache_factory"), r"schedule.*only apply with base='pyramidkv'"),
    ("adakv", dict(allocation="global"), r"allocation must be one of \['kvpress', 'adakv'\]"),
    ("adakv", dict(head_adaptive=False), r"head_adaptive=False is not available"),
    ("pyramidkv", dict(schedule="linear"), r"schedule must be one of \['exact', 'kvcache_factory'\]"),
    ("pyramidkv", dict(schedule="kvcache_factory", infeasible="cap"), r"infeasible has no effect"),
    ("snapkv", dict(head_adaptive="no"), r"head_adaptive must be True or False, got 'no'"),
    ("h2o", dict(head_adaptive=1), r"head_adaptive must be True or False, got 1"),
    ("vlcache", dict(head_adaptive=None), r"head_adaptive must be True or False"),
    ("vlcache", dict(different_window_per_layer=0), r"different_window_per_layer must be True or False"),
    ("snapkv", dict(merge="mean"), r"merge must be one of \['none', 'pivot', 'average'\]"),
    ("h2o", dict(merge=True), r"merge must be one of"),
    ("lookm", dict(merge="none", merge_scope="same_modality"), r"merge_scope has no effect"),
    ("lookm", dict(merge_scope="text"), r"merge_scope must be one of"),
    ("lookm", dict(hh_ratio=0.2), r"hh_ratio and recent_ratio go together"),
    ("lookm", dict(hh_ratio=0.2, recent_ratio=0.1, ratio=0.5), r"ratio cannot be given"),
    ("lookm", dict(hh_ratio=0.2, recent_ratio=0.1, recent_fraction=0.3), r"recent_fraction cannot be given"),
    ("lookm", dict(hh_ratio=0.0, recent_ratio=0.1), r"hh_ratio must be in \(0.0, 1.0\]"),
    ("lookm", dict(hh_ratio=float("nan"), recent_ratio=0.1), r"hh_ratio must be in"),
    ("lookm", dict(hh_ratio=0.2, recent_ratio=float("inf")), r"recent_ratio must be in"),
])
def test_parity_option_errors(models, method, cfg, match):
    with pytest.raises(ConfigError, match=match):
        me.apply(models[0], method, **cfg)


def test_existing_valid_adakv_uses_still_accepted(models):
    for cfg in (dict(), dict(beta=20.0), dict(base="pyramidkv", beta=8.0, infeasible="cap"),
                dict(base="pyramidkv", schedule="kvcache_factory"), dict(merge="pivot")):
        with me.apply(models[0], "adakv", ratio=0.5, window=4, **cfg):
            models[0](input_ids=ids_of(24, 17), use_cache=True)


def test_merge_filler_slot_never_unmarks_a_kept_slot():
    """A filler slot (valid False) gathers slot 0; slot 0 kept by the same head must stay a pivot, not be merged
    into itself as if evicted."""
    from types import SimpleNamespace

    from mllm_efficiency.kv.merge import merge_evicted

    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    inp = SimpleNamespace(key=key, value=value, real=torch.ones(1, 5, dtype=torch.bool), visual=None)
    idx = torch.tensor([[[0, 3, 0]]])  # kept 0 and 3, then a filler pointing at slot 0
    valid = torch.tensor([[[True, True, False]]])
    k, v = merge_evicted(inp, idx, valid, "pivot")
    k_ref, v_ref = ref_merge(key[0, 0].to(DT), value[0, 0].to(DT), [0, 3], "pivot")
    torch.testing.assert_close(k[0, 0, :2].to(DT), k_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(v[0, 0, :2].to(DT), v_ref, atol=1e-6, rtol=0)
