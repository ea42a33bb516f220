"""Focus token_dedup's lean path: aten ops per deduplicated point, host syncs per prefill, the overflow redo."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mllm_efficiency as me
from mllm_efficiency.video import similarity as S
from mllm_efficiency.video.layout import Grid

SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "bincount", "masked_select", "_unique2"}
NO_KERNEL = {"empty", "empty_like", "empty_strided", "scalar_tensor", "lift_fresh", "detach", "alias"}


class _Ops(TorchDispatchMode):
    """aten ops that would launch a kernel (views and allocations excluded) and ops that sync with a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.syncs += 1
        if not func.is_view and name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _logits(model, p):
    with torch.no_grad():
        return model(**p).logits


def _video(frames, H=4, W=4, C=32, static=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = frames * H * W
    x = torch.randn(1, n + 3, C, generator=g)
    keep = torch.rand(H * W, generator=g) < static
    for t in range(1, frames):
        rows = torch.arange(H * W)[keep] + t * H * W + 2
        x[0, rows] = x[0, rows - H * W] + 0.01 * torch.randn(rows.numel(), C, generator=g)
    grid = torch.full((1, n + 3), -1)
    grid[0, 2:2 + n] = torch.arange(n)
    return x, grid, [[Grid(2, frames, H, W)]]


@pytest.mark.parametrize("frames,m_size", [(8, -1), (64, -1), (64, 1024)])
def test_ops_per_deduplicated_point_are_bounded(frames, m_size):
    """Default temporal matching (one candidate per row): detection, roots, plan and group means of a point in
    at most 25 + ceil(log2(frames)) aten ops (fp32 input; bf16 adds two casts), none of them a host sync; the
    table (once per kept set) is built without a sync either."""
    x, grid, grids = _video(frames)
    x2d = x.reshape(-1, x.shape[-1])
    with _Ops() as table_ops:
        t = S.lean_table(S.row_candidates(grid, grid >= 0, grids, frame_block=2, block=1), m_size)
    assert table_ops.syncs == 0 and t.jumps == (frames - 2).bit_length()
    with _Ops() as point:
        root, zero, xf = S.lean_roots(x2d, t, threshold=0.9)
        plan = S.lean_plan(x2d, root, x2d.shape[0] * 3 // 5, t.ones, xf, t.ar)
    n_ops = sum(point.ops.values())
    assert point.syncs == 0 and n_ops <= 25 + t.jumps, point.ops
    ref = S.match_rows(x2d, S.row_neighbours(grid, grid >= 0, grids, frame_block=2, block=1, m_size=m_size),
                       threshold=0.9, m_size=m_size)
    assert torch.equal(root, ref.root) and int(zero) == 0
    assert int(plan.groups) == x2d.shape[0] - int(ref.removed()) <= plan.cap
    assert torch.equal(plan.means[plan.expand], S.group_mean(x2d, S.Matching(ref.code.new_zeros(0), ref.root[:, None], 1), 0))


def test_lean_plan_equals_group_means_and_flags_overflow():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 6, generator=g)
    root = torch.tensor([0, 0, 2, 3, 2, 5, 0, 3, 8, 0])
    ref = S.dedup_plan(root)
    plan = S.lean_plan(x, root, 7, torch.ones(10))
    assert int(plan.groups) == 5 and plan.means.shape == (7, 6)
    assert torch.equal(plan.means[:5], S.group_means_rows(x, ref)) and not plan.means[5:].any()
    assert torch.equal(plan.means[plan.expand], S.group_means_rows(x, ref)[ref.expand])
    small = S.lean_plan(x, root, 3, torch.ones(10))  # 5 groups in 3 slots: no error, reported by `groups`
    assert int(small.groups) == 5 > small.cap and int(small.expand.max()) == 2


CFG = dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3, min_dedup_fraction=0.0)


def test_prefill_syncs_and_point_ops(ov, ov_prompt):
    """A deduplicating prefill: one host sync per SEC stage (its estimate) and one at the end, whatever the
    number of points (counted with the benchmark's CPU proxies: sync aten ops and `tolist`); ops per point
    bounded (the whole prefill against SEC only, tables and stage samples included)."""
    from conftest import load_script

    bv = load_script("benchmarks/video/bench_video.py")

    def run(**kw):
        with me.apply(ov, "focus", **CFG, **kw) as h:
            _logits(ov, ov_prompt)
            return bv.count_prefill(lambda: _logits(ov, ov_prompt)), h.stats

    sec, _ = run(sec_only=True)
    dedup, st = run(sic_mode="token_dedup")
    points = sum(c < t for c, t in st.dedup_rows.values())
    assert points == 16 and st.dedup_redos == 0
    assert dedup["sync_ops"] - sec["sync_ops"] == 2 + 1, dedup["sync_sites"]  # 2 stages + the end
    # per point (16): matching, roots, plan, means and the expansion of each linear output (q/k/v: 3); per
    # candidate table (3: before SEC, the selected layer's compacted MLP, after SEC) its build and a stage sample
    assert dedup["ops"] - sec["ops"] <= 16 * 30 + 3 * 90


def test_threshold_one_leaves_outputs_unchanged(ov, ov_prompt):
    with me.apply(ov, "focus", **dict(CFG, similarity_threshold=1.0), sec_only=True):
        sec = _logits(ov, ov_prompt)
    with me.apply(ov, "focus", **dict(CFG, similarity_threshold=1.0), sic_mode="token_dedup") as h:
        assert torch.equal(_logits(ov, ov_prompt), sec) and h.stats.rows_removed("q_proj") == 0


def test_overflow_redo_equals_dense_at_that_point(ov, ov_prompt):
    """A capacity too small for a point's groups: the prefill is redone with that point dense, giving exactly the
    result of a run where that point is dense from the start; every other point is still deduplicated."""
    point = ("gate_proj", 2)
    with me.apply(ov, "focus", sic_mode="token_dedup", **CFG) as h:
        h._attached.force_dense = {point}
        ref = _logits(ov, ov_prompt)
        ref_rows = dict(h.stats.dedup_rows)
    with me.apply(ov, "focus", sic_mode="token_dedup", **CFG) as h:
        focus = h._attached
        focus.capacity = lambda key, cap: 1 if key == point else cap
        out = _logits(ov, ov_prompt)
        st = h.stats
        assert st.dedup_redos == 1 and st.prefills == 1 and focus.force_dense == set()
        assert st.dedup_rows == ref_rows and st.dedup_rows[point][0] == st.dedup_rows[point][1]
        assert st.rows_removed("q_proj") > 0
        again = _logits(ov, ov_prompt)  # the next prefill starts afresh (and redoes again)
        assert st.dedup_redos == 2 and torch.equal(again, out)
    assert torch.equal(out, ref)


def test_overflow_everywhere_falls_back_to_sec_only(ov, ov_prompt):
    with me.apply(ov, "focus", sec_only=True, **CFG):
        sec = _logits(ov, ov_prompt)
    with me.apply(ov, "focus", sic_mode="token_dedup", **CFG) as h:
        h._attached.capacity = lambda key, cap: 1
        assert torch.equal(_logits(ov, ov_prompt), sec) and h.stats.dedup_redos == 1


def test_overflow_redo_in_generate(ov, ov_prompt):
    """The redo empties the caller's cache first: generation continues from the redone prefill."""
    with me.apply(ov, "focus", sic_mode="token_dedup", **CFG) as h:
        h._attached.force_dense = {("gate_proj", 2)}
        with torch.no_grad():
            ref = ov.generate(**ov_prompt, max_new_tokens=3, do_sample=False)
    with me.apply(ov, "focus", sic_mode="token_dedup", **CFG) as h:
        h._attached.capacity = lambda key, cap: 1 if key == ("gate_proj", 2) else cap
        with torch.no_grad():
            out = ov.generate(**ov_prompt, max_new_tokens=3, do_sample=False)
        assert h.stats.dedup_redos == 1
    assert torch.equal(out, ref)
