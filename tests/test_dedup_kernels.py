"""The fused Triton kernels of token_dedup (video/dedup_kernels.py) against the eager path, run on CPU under
Triton's interpreter (the same kernels run compiled on CUDA)."""
from __future__ import annotations

import copy

import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.video import dedup_kernels as DK
from mllm_efficiency.video import similarity as S


@pytest.fixture
def dev():
    """Where the kernels run: CUDA when there is one (compiled), else the CPU under Triton's interpreter, which
    conftest chose before triton was first imported (it cannot be switched later)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if not DK.interpreting():
        pytest.skip("TRITON_INTERPRET was set to 0 on a machine without CUDA")
    return "cpu"


class _Untiled:
    tiled = False


def _planted(M, C, dtype, seed):
    """Rows with near-copies of earlier rows (cosine ~0.99), all-zero rows, and unrelated rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, C, generator=g)
    perm = torch.randperm(M, generator=g)
    src, dst = perm[:M // 3], perm[M // 3:2 * (M // 3)]
    x[dst] = x[src] + 0.1 * torch.randn(len(dst), C, generator=g)
    x[perm[-3:]] = 0
    return x.to(dtype), src, dst


def _eager_cosines(x, rows, cand):
    v, c = x[rows].float(), x[cand.clamp_min(0)].float()
    cos = torch.nn.functional.cosine_similarity(v[:, None], c, dim=-1)
    return torch.where(cand >= 0, cos, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 3, 7])
def test_choose_codes_equal_eager_choice(dev, dtype, K):
    M, C = 120, 1100  # C > BLOCK: the row loop takes two steps, the second one partial
    x, src, dst = _planted(M, C, dtype, seed=K)
    g = torch.Generator().manual_seed(10 + K)
    rows = torch.arange(M)
    cand = torch.randint(-1, M, (M, K), generator=g)
    cand[dst, K - 1] = src  # the planted copy is the last candidate
    for threshold in (0.5, 0.9, 1.0):
        cos = _eager_cosines(x, rows, cand)
        if threshold < 1.0:  # no decision within rounding of the threshold (1.0: cosines are clamped to 1)
            assert ((cos - threshold).abs() > 1e-3).all()
        eager = S._choose(x, _Untiled, rows, cand, None, threshold=threshold, m_size=-1)
        fused = DK.choose_codes(x.to(dev), rows.to(dev), cand.to(dev), threshold).cpu()
        assert torch.equal(fused, eager)
        if threshold < 1.0:  # every planted copy matched, to its best candidate
            assert (fused[dst] > 0).all()
            assert torch.equal(cos[dst].gather(1, fused[dst, None] - 1)[:, 0], cos[dst].amax(1))
        else:
            assert (fused == 0).all()  # cosines are clamped to 1: threshold 1.0 never matches


def test_choose_codes_on_a_row_subset_with_masked_candidates(dev):
    x, src, dst = _planted(64, 96, torch.bfloat16, seed=3)
    rows = dst.unique()
    cand = torch.stack([rows - 1, torch.full_like(rows, -1)], 1)  # a masked candidate in second place
    eager = S._choose(x, _Untiled, rows, cand, None, threshold=0.2, m_size=-1)
    x, rows, cand = x.to(dev), rows.to(dev), cand.to(dev)
    assert torch.equal(DK.choose_codes(x, rows, cand, 0.2).cpu(), eager)
    assert DK.choose_codes(x, rows[:0], cand[:0], 0.2).numel() == 0


def _random_roots(M, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    root = torch.arange(M)
    for i in range(1, M):
        if torch.rand(1, generator=g) < p:
            root[i] = root[torch.randint(0, i, (1,), generator=g)]
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_means_equal_eager_group_means_bitwise(dev, dtype):
    """Against the eager means on the CPU (sequential fp32 sums in row order; CUDA's index_add_ is unordered),
    with the exact group count and with capacity M (what Focus queues before the sync: the first U rows)."""
    for M, p in ((1, 0.5), (40, 0.0), (40, 0.5), (200, 0.8)):
        x = torch.randn(M, 1030, generator=torch.Generator().manual_seed(M)).to(dtype)
        root = _random_roots(M, seed=M, p=p)
        eager = S.group_means_rows(x, S.dedup_plan(root))
        x, draft = x.to(dev), S.PlanDraft.of(root.to(dev), lists=True)
        plan = draft.finish()
        U = plan.unique.numel()
        assert torch.equal(DK.group_means(x, draft.members, draft.starts, draft.sizes, U).cpu(), eager)
        plan.means = DK.group_means(x, draft.members, draft.starts, draft.sizes, M)[:U]
        assert torch.equal(S.group_means_rows(x, plan).cpu(), eager)  # a plan's own means are used


def test_plan_member_lists_describe_the_groups():
    root = _random_roots(60, seed=1, p=0.6)
    draft = S.PlanDraft.of(root, lists=True)
    plan = draft.finish()
    U = plan.unique.numel()
    assert int(draft.sizes.sum()) == 60 and (draft.sizes[U:] == 0).all()
    for g, u in enumerate(plan.unique.tolist()):
        members = draft.members[draft.starts[g]:draft.starts[g] + draft.sizes[g]]
        assert members[0] == u  # the root first, then its members ascending
        assert torch.equal(members, (root == u).nonzero().flatten())
    plain = S.PlanDraft.of(root)
    assert torch.equal(plain.finish().unique, plan.unique) and plain.members is None


def _logits(model, p):
    with torch.no_grad():
        return model(**p).logits


@pytest.mark.parametrize("cfg", [dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3),
                                 dict(selected_layers=(1,), alpha_list=(0.6,), similarity_threshold=0.2,
                                      block_size=2, gemm_m_size=5),
                                 dict(selected_layers=(0, 1), alpha_list=(0.7, 0.5), similarity_threshold=0.2,
                                      gemms=("q_proj", "gate_proj", "down_proj"), whole_mlp=True)])
def test_focus_token_dedup_fused_equals_eager(dev, ov, ov_prompt, cfg):
    """The whole prefill with the fused kernels: the same rows deduplicated at every point as the eager path,
    the same logits up to the order of fp32 sums in the cosines; a batch of two included."""
    if dev == "cuda":  # a copy on the GPU: the shared fixture stays on the CPU
        ov = copy.deepcopy(ov).to(dev)
        ov_prompt = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in ov_prompt.items()}
    batch = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v
             for k, v in ov_prompt.items()}
    for prompt in (ov_prompt, batch):
        res = []
        for fused in (False, True):
            with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.0, fused_kernels=fused,
                          **cfg) as h:
                res.append((_logits(ov, prompt), h.stats.dedup_rows, h.stats.sic_counts))
        assert res[0][1:] == res[1][1:]
        assert sum(t - c for c, t in res[1][1].values()) > 0  # rows were removed
        assert torch.allclose(res[0][0], res[1][0], atol=1e-5, rtol=1e-5)


def test_fused_kernels_setting_is_checked(ov, ov_prompt, monkeypatch):
    """Bad values are refused when applied; True without Triton too, and True on CPU tensors when the prefill
    runs (unless interpreting)."""
    with pytest.raises(ConfigError, match="fused_kernels"):
        me.apply(ov, "focus", sic_mode="token_dedup", fused_kernels="yes")
    if DK.triton is None:
        with pytest.raises(ConfigError, match="needs Triton"):
            me.apply(ov, "focus", sic_mode="token_dedup", fused_kernels=True)
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call: CPU tensors are then refused
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.0, fused_kernels=True,
                  selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3):
        with pytest.raises(RuntimeError, match="fused_kernels=True needs a CUDA device"):
            _logits(ov, ov_prompt)


def test_choose_roots_equal_eager_roots_and_count(dev):
    """Links to earlier rows only (as the candidate tables): chains of copies resolve to their first row."""
    M, C = 150, 300
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, C, generator=g)
    for i in range(10, M, 3):  # chains: row i repeats row i - 10 (itself maybe a repeat)
        x[i] = x[i - 10] + 0.05 * torch.randn(C, generator=g)
    x = x.to(torch.bfloat16)
    rows = torch.arange(10, M)
    cand = torch.stack([rows - 10, rows - 1, torch.where(rows % 2 == 0, rows - 3, -1)], 1)
    eager_code = S._choose(x, _Untiled, rows, cand, None, threshold=0.9, m_size=-1)
    link = torch.arange(M)
    link[rows] = torch.where(eager_code > 0, cand.gather(1, (eager_code - 1).clamp_min(0)[:, None])[:, 0], rows)
    eager_root = link.clone()
    for _ in range(8):
        eager_root = eager_root[eager_root]
    root, count = DK.choose_roots(x.to(dev), rows.to(dev), cand.to(dev), 0.9)
    assert torch.equal(root.cpu(), eager_root)
    assert int(count) == int((eager_code > 0).sum()) > 20
    copies = torch.zeros(M, dtype=torch.bool)
    copies[10::3] = True
    linked = eager_root != torch.arange(M)
    assert copies[linked].all() and not copies[eager_root].any()  # each copy leads to an original
    empty_root, none = DK.choose_roots(x.to(dev), rows[:0].to(dev), cand[:0].to(dev), 0.9)
    assert torch.equal(empty_root.cpu(), torch.arange(M)) and int(none) == 0


@pytest.mark.parametrize("sel,thr,cut,expect", [((1,), 0.3, 1.0, ([0, 1], [])), ((2,), 0.2, 0.2, ([0], [1])),
                                                ((0,), 0.2, 0.2, ([0], [1])), ((0, 2), 0.1, 0.15, None),
                                                ((1,), 0.3, 0.3, None)])
def test_fused_stage_decisions(dev, ov, ov_prompt, sel, thr, cut, expect):
    """min_dedup_fraction with the fused kernels: every matched point's fraction is exact, and a stage after the
    first is decided one layer late (its first layer runs dense); otherwise the eager rule. Stage 0 (decided at
    once) takes the eager path's decisions (on this tiny model the eager samples cover every row: exact too)."""
    from test_video_methods import _stage_rule_holds

    if dev == "cuda":
        ov = copy.deepcopy(ov).to(dev)
        ov_prompt = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in ov_prompt.items()}
    cfg = dict(selected_layers=sel, alpha_list=(0.5,) * len(sel), similarity_threshold=thr, min_dedup_fraction=cut)
    stats = []
    for fused in (False, True):
        with me.apply(ov, "focus", sic_mode="token_dedup", fused_kernels=fused, **cfg) as h:
            _logits(ov, ov_prompt)
            stats.append(h.stats)
    got = _stage_rule_holds(stats[1], sel, cut, 4, lagged=True)
    if expect is not None:
        assert got == expect
    stage0 = range(sel[0] + 1)
    for name in ("dedup_rows", "duplicates"):
        eager, fused = (sorted((k, v) for k, v in getattr(st, name).items() if k[1] in stage0) for st in stats)
        assert fused == eager


def test_min_dedup_rows_leaves_small_inputs_dense(ov, ov_prompt):
    cfg = dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3, sic_mode="token_dedup",
               min_dedup_fraction=0.0)
    with me.apply(ov, "focus", **cfg) as h:
        _logits(ov, ov_prompt)
        rows = {k: t for k, (_, t) in h.stats.dedup_rows.items()}
    cut = sorted(set(rows.values()))[-1]  # the largest inputs (before SEC) only
    with me.apply(ov, "focus", min_dedup_rows=cut, **cfg) as h:
        _logits(ov, ov_prompt)
        for key, (computed, total) in h.stats.dedup_rows.items():
            assert total == rows[key]
            if total < cut:
                assert computed == total and key not in h.stats.duplicates
        assert any(c < t for c, t in h.stats.dedup_rows.values())
    with pytest.raises(ConfigError, match="min_dedup_rows"):
        me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_rows=-1)


@pytest.mark.parametrize("fused", [False, True])
def test_dedup_stages_until_dense_stops_after_a_dense_stage(request, ov, ov_prompt, fused):
    """dedup_stages="until_dense": after a stage that ran dense no later stage is matched; "each" matches and
    deduplicates a later stage on its own (the same prompt and settings)."""
    dev = request.getfixturevalue("dev") if fused else "cpu"
    if dev == "cuda":
        ov = copy.deepcopy(ov).to(dev)
        ov_prompt = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in ov_prompt.items()}
    cfg = dict(sic_mode="token_dedup", selected_layers=(2,), alpha_list=(0.5,), similarity_threshold=0.2,
               min_dedup_fraction=0.2, fused_kernels=fused)
    with me.apply(ov, "focus", **cfg) as h:
        _logits(ov, ov_prompt)
        assert ("q_proj", 3) in h.stats.duplicates  # stage 1 matched (and, eager, deduplicated)
        assert h.stats.dense_layers == [0, 1, 2] + ([3] if fused else [])
    with me.apply(ov, "focus", dedup_stages="until_dense", **cfg) as h:
        _logits(ov, ov_prompt)
        assert list(h.stats.duplicates) == [("q_proj", 0)]  # stage 0's first point only
        assert h.stats.dense_layers == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="dedup_stages"):
        me.apply(ov, "focus", sic_mode="token_dedup", dedup_stages="never")
