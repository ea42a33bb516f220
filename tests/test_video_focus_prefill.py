"""Focus's prefill path: the selected layers' MLPs on the kept rows only (mid_layer), SEC without host
synchronisations, and the video benchmark's FLOPs-matched Focus arms."""
from __future__ import annotations

import collections
import json
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import mllm_efficiency as me
from mllm_efficiency.core.attention_rows import ROW_CHUNK, key_scores
from mllm_efficiency.video.focus import _Compaction, text_row_max_scores
from conftest import load_script


def _logits(model, p):
    with torch.no_grad():
        return model(**p).logits


def _mlp_rows(model, layers):
    """Rows every decoder layer's down_proj computes, per call."""
    seen = collections.defaultdict(list)
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].shape[1]))
               for i, layer in enumerate(layers)]
    return seen, handles


def test_mid_layer_runs_the_selected_layers_mlp_on_the_kept_rows(ov, ov_prompt):
    layers = ov.model.language_model.layers
    cfg = dict(selected_layers=(0, 2), alpha_list=(0.5, 0.25), sec_only=True)
    res = {}
    for placement in ("next_layer", "mid_layer"):
        seen, handles = _mlp_rows(ov, layers)
        try:
            with me.apply(ov, "focus", placement=placement, **cfg) as h:
                res[placement] = (_logits(ov, ov_prompt), dict(seen), dict(h.stats.mlp_rows),
                                  list(h.stats.tokens_per_layer), h.stats.gemm_rows())
        finally:
            for hd in handles:
                hd.remove()
    logits_n, rows_n, mlp_n, tokens, gemm_n = res["next_layer"]
    logits_m, rows_m, mlp_m, tokens_m, gemm_m = res["mid_layer"]
    assert torch.equal(logits_n, logits_m) and tokens == tokens_m
    assert mlp_n == {} and gemm_n == {}
    # the MLP of a selected layer sees the rows that survive its SEC step: the next layer's input length
    assert rows_n[0] == [tokens[0]] and rows_m[0] == [tokens[1]]
    assert rows_n[2] == [tokens[2]] and rows_m[2] == [tokens[3]]
    assert rows_m[1] == rows_n[1] == [tokens[1]] and rows_m[3] == rows_n[3]
    assert mlp_m == {0: [tokens[1], tokens[0]], 2: [tokens[3], tokens[2]]}
    assert gemm_m[("gate_proj", 0)] == gemm_m[("down_proj", 0)] == (tokens[1], tokens[0])


def test_compaction_of_a_ragged_batch():
    """Kept slots go through the MLP exactly; dropped slots get zeros unless a sample with fewer drops
    computes some of them (they are dropped by the next layer's input anyway)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g)
    keep = torch.tensor([[1, 1, 0, 1, 0, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    plan = _Compaction.of(0, keep, int(keep.sum(1).max()))
    lin = torch.nn.Linear(5, 3)
    with torch.no_grad():
        y = plan.scatter(lin(plan.gather(x)))
        ref = lin(x)
    assert y.shape == ref.shape and plan.index.shape == (2, 8)
    assert torch.allclose(y[keep], ref[keep], atol=1e-6, rtol=0)  # (GEMM rounding may depend on M)
    computed = torch.zeros_like(keep).scatter_(1, plan.index, True)
    assert torch.equal(y[~computed], torch.zeros_like(y[~computed]))
    one = _Compaction.of(0, keep[1:], int(keep[1].sum()))
    with torch.no_grad():
        assert torch.allclose(one.scatter(lin(one.gather(x[1:])))[keep[1:]], ref[1:][keep[1:]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_text_row_scores_equal_key_scores(masked):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, ROW_CHUNK + 300, 8
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    mask = None
    if masked:
        mask = torch.zeros(B, 1, L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        mask[1, :, :, :7] = float("-inf")  # left padding of sample 1
    row_start = torch.tensor([250, 180])
    ref = key_scores(q, k, mask, 0.3, "text_rows", "max", "max", row_start)
    assert torch.equal(text_row_max_scores(q, k, mask, 0.3, row_start, 180), ref)


class _HostTransfers(TorchFunctionMode):
    """Calls from the package that move a value from the device to the host (synchronisations on CUDA)."""

    CALLS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero, torch.equal, torch.Tensor.cpu}

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.CALLS:
            frames = [f for f in traceback.extract_stack()[:-1] if "mllm_efficiency" in f.filename]
            if frames:
                self.sites[f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"] += 1
        return func(*args, **(kwargs or {}))


def test_sec_prefill_transfers_one_value_to_the_host(ov, ov_prompt):
    """Focus SEC (batch 1): the engine's one visual count per prefill; keep counts, score rows and the
    selected layers' MLP compaction are known on the host."""
    with me.apply(ov, "focus", selected_layers=(0, 1, 2), alpha_list=(0.5, 0.3, 0.2), sec_only=True) as h:
        _logits(ov, ov_prompt)  # the layout of these ids is built (and cached) here
        with _HostTransfers() as t:
            _logits(ov, ov_prompt)
        n = h.stats.num_visual[0]
        assert h.stats.keep_per_stage == [[max(1, int(a * n))] for a in (0.5, 0.3, 0.2)]
    assert sum(t.sites.values()) == 1 and list(t.sites)[0].startswith("engine.py"), t.sites


def test_token_dedup_host_syncs_and_ops(ov, ov_prompt):
    """token_dedup on top of SEC: a stage whose sampled estimate is below min_dedup_fraction costs one host sync
    (its candidate table and estimate together) and a bounded number of ops, whatever its layer count; where
    points are deduplicated, the only syncs are one per point matched in full (the plan's shapes), one per
    extra candidate table and the statistics' one, never inside the matching, the plan or the group means
    (no nonzero / bincount / item). Counted with the benchmark's CPU proxies."""
    bv = _bench()
    cfg = dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3)  # stages: layers 0-1, 2-3

    def counts(**kw):
        with me.apply(ov, "focus", **cfg, **kw) as h:
            _logits(ov, ov_prompt)  # layout and grid geometry built here
            c = bv.count_prefill(lambda: _logits(ov, ov_prompt))
            sites = collections.Counter()
            for item in filter(None, c["sync_sites"].split("; ")):
                site, n = item.rsplit(" x", 1)
                sites[site] += int(n)
            return c, sites, h.stats

    sec, sec_sites, _ = counts(sec_only=True)
    dense, dense_sites, st = counts(sic_mode="token_dedup", min_dedup_fraction=1.0)
    assert st.dense_layers == [0, 1, 2, 3]
    extra = dense_sites - sec_sites
    assert sum(extra.values()) == 2 and len(extra) == 1  # 1 per stage
    assert list(extra)[0].startswith("dedup_schedule.py")
    assert 0 < dense["ops"] - sec["ops"] <= 2 * 120
    live, live_sites, st = counts(sic_mode="token_dedup", min_dedup_fraction=1e-9)
    assert st.rows_removed("q_proj") > 0 and not st.dense_layers
    assert not any(s.startswith("similarity.py") for s in live_sites)
    focus_syncs = sum(n for s, n in live_sites.items() if s.startswith("dedup_schedule.py"))
    # 2 stages (their first points covered by the sample: no sync of their own), the other 14 points, the
    # selected layer's MLP table (mid_layer), the statistics
    assert len(st.duplicates) == 16 and focus_syncs == 2 + 14 + 1 + 1


# ----------------------------------------------------------------------------- benchmark
def _bench():
    return load_script("benchmarks/video/bench_video.py")


def test_focus_schedule_and_alpha_matching():
    bv = _bench()
    cfg = bv.QWEN2_7B
    prompt, n = 14 + 64 * 196 + 30, 64 * 196
    lens, rows = bv.focus_schedule(28, prompt, n, (3, 6, 9, 18, 26), (0.4, 0.3, 0.2, 0.15, 0.1))
    assert sum(lens) / 28 == pytest.approx(4165, abs=1)  # the H200 table's mean tokens / layer
    assert lens[:4] == [prompt] * 4 and lens[4] == 44 + int(0.4 * n) and rows[("gate_proj", 3)] == (lens[4], prompt)
    target = 26.3e12
    factor, alphas = bv.match_alphas(cfg, prompt, n, (3, 6, 9, 18, 26), (0.4, 0.3, 0.2, 0.15, 0.1), target)
    macs = bv.ops(cfg, *bv.focus_schedule(28, prompt, n, (3, 6, 9, 18, 26), alphas))
    assert macs <= target and 0 < factor < 1
    bigger = tuple(round(a + 2e-4, 4) for a in alphas)  # a slightly larger schedule exceeds the target
    assert bv.ops(cfg, *bv.focus_schedule(28, prompt, n, (3, 6, 9, 18, 26), bigger)) > target
    assert bv.match_alphas(cfg, prompt, n, (3, 6, 9, 18, 26), (0.4, 0.3, 0.2, 0.15, 0.1), 1e12) is None


def test_bench_tiny_runs_the_flops_matched_arms(tmp_path, capsys):
    bv = _bench()
    arms = ["dense", "framefusion_0.3", "focus_sec", "focus_sec_ffmatch", "focus_sec_dedup_ffmatch"]
    assert bv.main(["--tiny", "--frames", "8", "--warmup", "0", "--repeats", "1", "--focus-match-ff",
                    "--arms", *arms, "--out", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().err
    rows = {r["arm"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == set(arms)
    ff = rows["framefusion_0.3"]["tmacs"]
    for name in ("focus_sec_ffmatch", "focus_sec_dedup_ffmatch"):
        r = rows[name]
        assert r["tmacs_sec"] <= ff and r["tmacs"] <= r["tmacs_sec"] and r["macs_vs_ff"] <= 1
        assert r["alphas"] == rows["focus_sec_ffmatch"]["alphas"] != rows["focus_sec"]["alphas"]
    assert rows["focus_sec_ffmatch"]["tmacs"] == rows["focus_sec_ffmatch"]["tmacs_sec"]
    assert "alphas" in (tmp_path / "results.md").read_text()
