"""Video token concentration (focus, framefusion, cmc, adaptiv) on tiny random video models."""
from __future__ import annotations

import bisect
import math

import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.adapters import get_adapter
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.testing import tiny
from mllm_efficiency.video import similarity as S
from mllm_efficiency.video.adaptiv import grid_drop_mask
from mllm_efficiency.video.framefusion import prune_ratio
from mllm_efficiency.video.layout import build_layout
from mllm_efficiency.video.tracegen import qwen_video_prompt


@pytest.fixture(scope="module")
def qwen():
    return tiny.tiny_qwen2_5_vl(num_layers=4)


def _logits(model, p):
    with torch.no_grad():
        return model(**p).logits


NEUTRAL = [("focus", dict(selected_layers=(0, 1), alpha_list=(1.0, 1.0), similarity_threshold=1.0)),
           ("focus", dict(selected_layers=(1,), alpha_list=(1.0,), similarity_threshold=1.0,
                          sic_mode="token_dedup")),
           ("framefusion", dict(cost=1.0, similarity_lower_bound=1.0)),
           ("adaptiv", dict(threshold=1.0)),
           ("cmc", dict(fc_threshold=0.0, query_threshold=0.0))]


@pytest.mark.parametrize("name,cfg", NEUTRAL)
def test_neutral_settings_leave_logits_unchanged(ov, ov_prompt, name, cfg):
    ref = _logits(ov, ov_prompt)
    with me.apply(ov, name, **cfg):
        out = _logits(ov, ov_prompt)
    assert torch.equal(out, ref)
    assert torch.equal(_logits(ov, ov_prompt), ref)  # removed cleanly


def test_neutral_focus_on_qwen25_vl_video(qwen):
    p = qwen_video_prompt(frames=4)
    ref = _logits(qwen, p)
    with me.apply(qwen, "focus", selected_layers=(0,), alpha_list=(1.0,), similarity_threshold=1.0):
        assert torch.equal(_logits(qwen, p), ref)


def test_layout_reproduces_visual_token_count(ov, ov_prompt, qwen):
    a = get_adapter(ov)
    lay = build_layout(a, ov_prompt["input_ids"], {"pixel_values_videos": ov_prompt["pixel_values_videos"]})
    g = lay.grids[0][0]
    n_video = int((ov_prompt["input_ids"] == tiny.VIDEO_TOKEN).sum())
    assert (g.frames, g.height * g.width) == (8, 4)
    assert g.size in (n_video, n_video - 1)  # the video newline is not on the grid
    p = qwen_video_prompt(frames=4)
    lay = build_layout(get_adapter(qwen), p["input_ids"], p)
    g = lay.grids[0][0]
    assert (g.frames, g.height, g.width) == (2, 2, 2) and g.size == int((p["input_ids"] == tiny.QWEN_VIDEO).sum())


@pytest.mark.parametrize("family", ["onevision", "qwen2_5_vl"])
def test_generate_sees_the_forwards_layout(ov, ov_prompt, qwen, family):
    """model.generate (transformers 5.24) runs the vision encoder before the prefill and calls the forward with
    `mm_encoder_outputs` instead of the pixels and grids: the layout must still be the forward's (not one frame
    of every video token), and removing the method leaves the encoder methods as they were."""
    model, p = (ov, ov_prompt) if family == "onevision" else (qwen, qwen_video_prompt(frames=4))
    base = model.base_model
    with me.apply(model, "framefusion", cost=0.5) as h:
        source = h._attached.layout_source
        with torch.no_grad():
            model(**p)
        grids = source.layout.grids
        assert grids[0][0].frames > 1
        model.generate(**p, max_new_tokens=2, do_sample=False)
        assert source.layout.grids == grids
    assert "get_video_features" not in vars(base) and "get_image_features" not in vars(base)
    assert not [k for k in vars(base) if k.startswith("_mllm_eff")]


def test_sec_keep_counts_come_from_the_original_count(ov, ov_prompt):
    alphas = (0.5, 0.3, 0.2)
    with me.apply(ov, "focus", selected_layers=(0, 1, 2), alpha_list=alphas, sec_only=True) as h:
        _logits(ov, ov_prompt)
        n = h.stats.num_visual[0]
        assert h.stats.keep_per_stage == [[max(1, int(a * n))] for a in alphas]
        assert h.stats.visual_per_layer == [n] + [max(1, int(a * n)) for a in alphas]


def test_sec_importance_is_max_max_of_text_rows_like_eager(ov_prompt):
    """The kept set equals the top-k of an eager max-over-heads, max-over-text-rows reference."""
    model = tiny.tiny_llava_onevision(num_layers=3, attn_implementation="eager")
    ids = ov_prompt["input_ids"]
    with torch.no_grad():
        out = model(**ov_prompt, output_attentions=True)
    visual = (ids[0] == tiny.VIDEO_TOKEN).nonzero().flatten()[:-1]  # the newline is not a grid token
    last = int(visual.max())  # query rows: every token after the grid (the newline is text)
    att = out.attentions[0][0]  # layer 0: (H, L, L)
    imp = att[:, last + 1:, :].amax(0).amax(0)[visual]
    k = max(1, int(0.5 * visual.numel()))
    expected = set(visual[torch.sort(imp, descending=True, stable=True).indices[:k]].tolist())
    with torch.no_grad(), me.apply(model, "focus", selected_layers=(0,), alpha_list=(0.5,), sec_only=True,
                                   record_trace=True) as h:
        model(**ov_prompt)
        kept = set((visual[h._attached.trace.kept[0].long()]).tolist())
    assert kept == expected


def test_placements_give_equal_kept_states(ov, ov_prompt):
    res = []
    for placement in ("mid_layer", "next_layer"):
        with me.apply(ov, "focus", selected_layers=(0, 1), alpha_list=(0.5, 0.25), sec_only=True,
                      placement=placement):
            res.append(_logits(ov, ov_prompt))
    assert torch.equal(res[0], res[1])


def test_methods_prune_and_generate(ov, ov_prompt):
    for name, cfg in [("focus", dict(selected_layers=(0, 1), alpha_list=(0.5, 0.25))),
                      ("focus", dict(selected_layers=(0, 1), alpha_list=(0.5, 0.25), sic_mode="token_dedup",
                                     similarity_threshold=0.0)),
                      ("framefusion", dict(similarity_lower_bound=-1.0)), ("adaptiv", dict(threshold=0.0))]:
        with me.apply(ov, name, **cfg) as h:
            with torch.no_grad():
                out = ov.generate(**ov_prompt, max_new_tokens=3, do_sample=False)
            assert out.shape[1] == ov_prompt["input_ids"].shape[1] + 3
            assert min(h.stats.cache_lengths) < ov_prompt["input_ids"].shape[1] + 2


# ----------------------------------------------------------------------------- SIC core
def _planted_grid():
    """2 frames of 2x3 tokens, 2 vectors of width 4; planted exact duplicates."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 8, generator=g)
    x[1, :4] = x[0, :4] * 2.0  # left neighbour, vector 0 (cosine 1)
    x[2, :4] = x[1, :4]  # chain 2 -> 1 -> 0
    x[6 + 4, 4:] = x[4, 4:]  # previous frame, same position, vector 1
    x[7] = 0.0  # all-zero token
    return x


def test_sic_matching_finds_planted_groups():
    x = _planted_grid()
    m = S.match_vectors(x, 2, 2, 3, vector_size=4, threshold=0.999, frame_block=2, block=2)
    sim = {(int(t), int(v)) for t, v in m.similar.nonzero()}
    assert sim == {(1, 0), (2, 0), (10, 1)}
    assert m.root[2, 0] == 0 and m.root[1, 0] == 0 and m.root[10, 1] == 4  # earliest member is the root
    assert bool(m.zero[7].all())
    assert m.code[10, 1] == 4  # prev-same is candidate 4 in the spec's order
    ref = x.clone()
    mean = (x[0, :4] + x[1, :4] + x[2, :4]) / 3
    ref[0, :4] = ref[1, :4] = ref[2, :4] = mean
    ref[4, 4:] = ref[10, 4:] = (x[4, 4:] + x[10, 4:]) / 2
    assert torch.allclose(S.group_mean(x, m, 4), ref, atol=1e-6, rtol=0)


def test_sic_threshold_is_strict_and_tiles_mask_candidates():
    x = _planted_grid()
    m = S.match_vectors(x, 2, 2, 3, vector_size=4, threshold=1.0, frame_block=2, block=2)
    assert not bool(m.similar.any())
    # one unpruned token per tile: no candidate is in the same tile
    m = S.match_vectors(x, 2, 2, 3, vector_size=4, threshold=0.999, frame_block=2, block=2, m_size=1)
    assert not bool(m.similar.any())
    # tiles of 6 unpruned tokens: 10 and 4 fall in different tiles (the zero token 7 is not counted)
    m = S.match_vectors(x, 2, 2, 3, vector_size=4, threshold=0.999, frame_block=2, block=2, m_size=6)
    assert not bool(m.similar[10, 1]) and bool(m.similar[1, 0])


def test_gather_gemm_scatter_equals_dense_gemm_on_averaged_input():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5, bias=True)
    with torch.no_grad():  # dyadic weights and inputs: every sum is exact, whatever the GEMM blocking
        lin.weight.copy_(torch.randint(-4, 5, (5, 8)) / 8)
        lin.bias.copy_(torch.randint(-4, 5, (5,)) / 8)
    x = torch.randint(-8, 9, (10, 8)).float() / 4
    root = torch.tensor([0, 0, 2, 3, 2, 5, 0, 3, 8, 0])  # groups {0,1,6,9}, {2,4}, {3,7} and singletons
    x[1] = x[0]; x[6] = x[0] + 0.25  # members differ: the mean matters
    plan = S.dedup_plan(root)
    rows = []
    h = lin.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    with torch.no_grad():
        y = S.dedup_linear(lin, x, plan)
        h.remove()
        averaged = x.clone()
        for r in root.unique():
            members = (root == r).nonzero().flatten()
            averaged[members] = x[members].mean(0)
        dense = lin(averaged)
    assert rows == [5]  # the GEMM ran on the unique rows only
    assert torch.equal(y, dense)


def test_token_dedup_equals_token_level_emulation(ov, ov_prompt):
    cfg = dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3, vector_size=0, block_size=1,
               gemms=("q_proj", "o_proj", "gate_proj", "down_proj"))
    with me.apply(ov, "focus", **cfg):
        emu = _logits(ov, ov_prompt)
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.0, **cfg) as h:
        fast = _logits(ov, ov_prompt)
        assert h.stats.rows_removed("q_proj") > 0
    assert torch.allclose(emu, fast, atol=1e-5, rtol=1e-5)


DEDUP_CFGS = [dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3),
              dict(selected_layers=(0, 1), alpha_list=(0.7, 0.5), similarity_threshold=0.2, placement="next_layer"),
              dict(selected_layers=(1,), alpha_list=(0.6,), similarity_threshold=0.2, block_size=2, gemm_m_size=5),
              dict(selected_layers=(1,), alpha_list=(0.6,), similarity_threshold=0.1, block_size=2,
                   mask_row_wrap=True, gemm_m_size=-1)]


@pytest.mark.parametrize("cfg", DEDUP_CFGS)
def test_token_dedup_fast_path_equals_full_grid_path(ov, ov_prompt, cfg):
    """min_dedup_fraction=0: the row-space matching (candidate table per kept set, one matching per GEMM input)
    gives bit-identical logits and statistics to the full-grid path (the previous implementation, still used
    with record_trace), for the same kept sets; batches included."""
    p2 = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.shape[0] == 1 else v for k, v in ov_prompt.items()}
    for prompt in (ov_prompt, p2):
        res = []
        for trace in (True, False):
            with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.0, record_trace=trace,
                          **cfg) as h:
                res.append((_logits(ov, prompt), h.stats.dedup_rows, h.stats.sic_counts, h.stats.visual_per_layer))
        assert torch.equal(res[0][0], res[1][0])
        assert res[0][1:] == res[1][1:]
        assert sum(t - c for c, t in res[1][1].values()) > 0  # rows were removed


def _stage_rule_holds(stats, selected, cut, n_layers, lagged=False):
    """The min_dedup_fraction rule, checked on one run's statistics: the first point (q_proj) of each SEC stage
    is estimated; below `cut` the stage's layers all run dense and nothing else of the stage is matched; above
    it each layer's q_proj decides for its layer, and a deciding layer's points are deduplicated exactly when
    their own fraction reaches `cut`. `lagged` (the fused path): a stage after the first is decided one layer
    late, so its first layer runs dense whatever its fraction. Returns (stages that ran dense, stages that did
    not)."""
    frac = {k: d / n for k, (d, n) in stats.duplicates.items()}
    stages = {}
    for layer in range(n_layers):
        stages.setdefault(bisect.bisect_left(selected, layer), []).append(layer)
    dense, live = [], []
    for stage, layers in stages.items():
        first = ("q_proj", layers[0])
        assert first in frac
        late = lagged and stage > 0 and cut > 0
        if late:
            assert layers[0] in stats.dense_layers
        if frac[first] < cut:
            dense.append(stage)
            assert all(l in stats.dense_layers for l in layers)
            assert [k for k in stats.duplicates if k[1] in layers] == [first]  # nothing else was matched
            continue
        live.append(stage)
        for layer in layers[1:] if late else layers:
            if frac[("q_proj", layer)] < cut:
                assert layer in stats.dense_layers
                assert [k for k in stats.duplicates if k[1] == layer] == [("q_proj", layer)]
                continue
            for gemm in ("q_proj", "o_proj", "gate_proj", "down_proj"):
                computed, total = stats.dedup_rows[(gemm, layer)]
                d, n = stats.duplicates[(gemm, layer)]
                assert n == total and computed == (total - d if d / n >= cut and d else total)
    return dense, live


def test_min_dedup_fraction_decides_per_stage(ov, ov_prompt):
    cfg = dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3)
    with me.apply(ov, "focus", sec_only=True, **cfg):
        sec = _logits(ov, ov_prompt)
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=1.0, **cfg) as h:
        assert torch.equal(_logits(ov, ov_prompt), sec)  # every layer ran dense: identical to SEC only
        st = h.stats
        assert st.rows_removed("q_proj") == 0 and st.rows_removed("down_proj") == 0
        assert st.duplicates_found("q_proj") > 0  # the first point of each stage was matched ...
        assert set(st.duplicates) == {("q_proj", 0), ("q_proj", 2)}  # ... and decided for the whole stage
        assert st.dense_layers == [0, 1, 2, 3]
        assert _stage_rule_holds(st, (1,), 1.0, 4) == ([0, 1], [])
    # a stage below the cut and one above it in the same prefill: layers 0-2 dense, layer 3 deduplicated
    cfg = dict(selected_layers=(2,), alpha_list=(0.5,), similarity_threshold=0.2)
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.2, **cfg) as h:
        _logits(ov, ov_prompt)
        assert _stage_rule_holds(h.stats, (2,), 0.2, 4) == ([0], [1])
        assert h.stats.dense_layers == [0, 1, 2] and h.stats.rows_removed("down_proj") > 0


@pytest.mark.parametrize("sel", [(0,), (1,), (2,), (0, 2)])
@pytest.mark.parametrize("thr", [0.1, 0.3])
@pytest.mark.parametrize("cut", [0.15, 0.2, 0.3])
def test_stage_rule_on_many_settings(ov, ov_prompt, sel, thr, cut):
    cfg = dict(selected_layers=sel, alpha_list=(0.5,) * len(sel), similarity_threshold=thr)
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=cut, **cfg) as h:
        _logits(ov, ov_prompt)
        _stage_rule_holds(h.stats, sel, cut, 4)


@pytest.mark.parametrize("cfg", DEDUP_CFGS)
def test_stage_path_equals_unconditional_path(ov, ov_prompt, cfg):
    """A cut below one row (1e-9): the stage path (table, sample and decision in one sync; the sample reused
    as the full matching when it covered every row) deduplicates exactly the points min_dedup_fraction=0 does
    (every layer's first point has a duplicate here): bit-identical logits and statistics."""
    res = []
    for cut in (0.0, 1e-9):
        with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=cut, **cfg) as h:
            res.append((_logits(ov, ov_prompt), h.stats.dedup_rows, h.stats.sic_counts, h.stats.duplicates))
            assert all(d for (g, _), (d, _) in h.stats.duplicates.items() if g == "q_proj")
    assert torch.equal(res[0][0], res[1][0])
    assert res[0][1:] == res[1][1:]


def _count_calls(monkeypatch, **functions) -> dict:
    """Wrap the named functions of the similarity module to count their calls: {label: count}, label=function."""
    calls = dict.fromkeys(functions, 0)

    def counting(label, fn):
        def wrapped(*a, **k):
            calls[label] += 1
            return fn(*a, **k)
        return wrapped

    for label, name in functions.items():
        monkeypatch.setattr(S, name, counting(label, getattr(S, name)))
    return calls


def test_sampled_stage_decision(ov, ov_prompt, monkeypatch):
    """With more candidate rows than `SAMPLE_ROWS`, a stage's first point is decided on a sample: a stage it
    sends dense is never matched in full (nor any other of its points), and outputs stay those of SEC only when
    nothing is deduplicated; in a stage above the cut, the other layers' first points are estimated on a
    sample of their own."""
    monkeypatch.setattr(S, "SAMPLE_ROWS", 4)
    calls = _count_calls(monkeypatch, full="match_rows", layer="count_duplicates", stage="sample_duplicates")
    cfg = dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3)
    with me.apply(ov, "focus", sec_only=True, **cfg):
        sec = _logits(ov, ov_prompt)
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=1.0, **cfg) as h:
        assert torch.equal(_logits(ov, ov_prompt), sec)
        assert calls == {"full": 0, "layer": 0, "stage": 2} and h.stats.dense_layers == [0, 1, 2, 3]
        assert set(h.stats.duplicates) == {("q_proj", 0), ("q_proj", 2)}
    calls.update(full=0, layer=0, stage=0)
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=1e-9, **cfg) as h:
        _logits(ov, ov_prompt)
        dups = h.stats.duplicates
        assert calls["stage"] == 2 and calls["layer"] == 2  # layers 1 and 3: their own sample
        assert h.stats.dense_layers != [0, 1, 2, 3] and h.stats.rows_removed("q_proj") > 0
        # every point of a deduplicating layer is matched in full, a layer sent dense by its sample not at all
        assert calls["full"] == sum(1 for _, l in dups if l not in h.stats.dense_layers)
    calls.update(full=0, layer=0, stage=0)
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.0, record_trace=True, **cfg):
        ref = _logits(ov, ov_prompt)  # the full-grid path
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.0, **cfg):
        assert torch.equal(_logits(ov, ov_prompt), ref) and not calls["stage"] and not calls["layer"]  # none at 0


def test_duplicate_estimate_from_a_sample():
    from mllm_efficiency.video.layout import Grid

    g = torch.Generator().manual_seed(0)
    F, H, W, C = 12, 8, 8, 32
    n = F * H * W
    x = torch.randn(n, C, generator=g)
    static = torch.rand(H * W, generator=g) < 0.3  # ~30% of the positions repeat the previous frame
    for t in range(1, F):
        rows = torch.arange(H * W)[static] + t * H * W
        x[rows] = x[rows - H * W] + 0.01 * torch.randn(rows.numel(), C, generator=g)
    grid = torch.arange(n)[None]
    nb = S.row_neighbours(grid, grid >= 0, [[Grid(0, F, H, W)]], frame_block=2, block=1, m_size=-1)
    assert nb.sample is not None and nb.sample.numel() == S.SAMPLE_ROWS < nb.rows.numel()
    exact = int(S.match_rows(x, nb, threshold=0.9).removed()) / n
    found, matched, complete = S.count_duplicates(x, nb, threshold=0.9)
    assert not complete and matched == S.SAMPLE_ROWS
    estimate = int(found) * nb.rows.numel() / (matched * n)
    assert exact > 0.2 and abs(estimate - exact) < 0.05
    nb.sample = None
    found, matched, complete = S.count_duplicates(x, nb, threshold=0.9)
    assert complete and int(found) / n == exact


@pytest.mark.parametrize("m_size", [-1, 100, 1024])
@pytest.mark.parametrize("frames", [4, 24])
def test_stage_sample_equals_the_compacted_tables_sample(frames, m_size):
    """`sample_duplicates` on the uncompacted table (P still on the device) matches the same rows as
    `count_duplicates` on the compacted one; when it covers every row (P <= SAMPLE_ROWS) its codes are
    `match_rows`'s and give the same roots (the stage path reuses them)."""
    from mllm_efficiency.video.layout import Grid

    g = torch.Generator().manual_seed(frames)
    H = W = 8
    C = 16
    n = frames * H * W
    x = torch.randn(1, n + 5, C, generator=g)
    static = torch.rand(H * W, generator=g) < 0.6
    for t in range(1, frames):
        rows = torch.arange(H * W)[static] + t * H * W + 3
        x[0, rows] = x[0, rows - H * W] + 0.01 * torch.randn(rows.numel(), C, generator=g)
    grid = torch.full((1, n + 5), -1)
    grid[0, 3:3 + n] = torch.arange(n)
    alive = (grid >= 0) & (torch.rand(1, n + 5, generator=g) > 0.2)
    grids = [[Grid(3, frames, H, W)]]
    x2d = x.reshape(-1, C)
    nb = S.row_neighbours(grid, alive, grids, frame_block=2, block=1, m_size=m_size)
    c = S.row_candidates(grid, alive, grids, frame_block=2, block=1)
    P, most = c.counts.tolist()
    assert P == nb.rows.numel() and (P > S.SAMPLE_ROWS) == (frames == 24)
    found, code, nonzero = S.sample_duplicates(x2d, c, threshold=0.9, m_size=m_size)
    ref, matched, complete = S.count_duplicates(x2d, nb, threshold=0.9, m_size=m_size)
    assert int(found) == int(ref) > 0 and matched == min(P, S.SAMPLE_ROWS) and complete == (P <= S.SAMPLE_ROWS)
    assert code.shape == (S.SAMPLE_ROWS,) and not code[min(P, S.SAMPLE_ROWS):].any()
    if complete:
        full = S.match_rows(x2d, nb, threshold=0.9, m_size=m_size)
        reused = S.match_rows(x2d, c.table(P, most, m_size), threshold=0.9, m_size=m_size, code=code[:P],
                              nonzero=nonzero)
        assert torch.equal(full.code, reused.code) and torch.equal(full.root, reused.root)
        assert torch.equal(full.nonzero, reused.nonzero)


def test_dedup_plan_orders_roots_then_members():
    g = torch.Generator().manual_seed(0)
    for M in (1, 7, 50):
        for _ in range(5):
            root = torch.arange(M)
            for i in range(1, M):
                if torch.rand(1, generator=g) < 0.5:
                    root[i] = root[torch.randint(0, i, (1,), generator=g)]
            plan = S.dedup_plan(root)
            is_root = root == torch.arange(M)
            unique = is_root.nonzero().flatten()
            assert torch.equal(plan.unique, unique)
            assert torch.equal(plan.dups, (~is_root).nonzero().flatten())
            assert torch.equal(unique[plan.expand], root) and plan.removed == M - unique.numel()
            assert torch.equal(S.dedup_plan(root, plan.removed).unique, unique)


def test_token_dedup_matches_each_gemm_input_once(ov, ov_prompt, monkeypatch):
    """q/k/v (and gate/up) share one matching and one set of group means; the candidate table is built once
    per kept set, not per GEMM."""
    calls = _count_calls(monkeypatch, match="match_rows", means="group_means_rows", table="row_candidates")
    rows = {}
    with me.apply(ov, "focus", sic_mode="token_dedup", min_dedup_fraction=0.0, selected_layers=(1,),
                  alpha_list=(0.5,), similarity_threshold=0.0) as h:
        attn = h._attached.adapter.layers[2].self_attn
        hooks = [getattr(attn, n).inner.register_forward_hook(
            lambda m, a, o, n=n: rows.__setitem__(n, a[0].shape[0])) for n in ("q_proj", "k_proj", "v_proj")]
        _logits(ov, ov_prompt)
        for hk in hooks:
            hk.remove()
        n_points = len(h.stats.dedup_rows)
        applied = sum(c < t for c, t in h.stats.dedup_rows.values())
    assert n_points == 16 and calls["match"] == 16  # 4 layers x (q/k/v, o, gate/up, down)
    assert calls["means"] == applied  # once per deduplicated input, not per linear layer
    assert 1 <= calls["table"] <= 3  # before SEC, the selected layer's MLP (mid_layer), after SEC
    assert rows["q_proj"] == rows["k_proj"] == rows["v_proj"] < ov_prompt["input_ids"].shape[1]


def _rows_reference(x, grids, live, **kw):
    """Roots per row from `match_vectors` on each sample's full grid (pruned tokens = zero rows)."""
    B, L, C = x.shape
    root = torch.arange(B * L).view(B, L).clone()
    for b in range(B):
        off, n = 0, sum(g.size for g in grids[b])
        G = torch.zeros(n, C)
        idx = torch.full((n,), -1, dtype=torch.long)
        for g in grids[b]:
            rng = torch.arange(g.start, g.start + g.size)
            keep = live[b, rng]
            G[off:off + g.size][keep] = x[b, rng][keep]
            idx[off:off + g.size][keep] = rng[keep]
            off += g.size
        off = 0
        for g in grids[b]:
            m = S.match_vectors(G[off:off + g.size], g.frames, g.height, g.width, vector_size=0, **kw)
            r = m.root[:, 0] + off
            for t in range(g.size):
                if idx[off + t] >= 0:
                    root[b, idx[off + t]] = b * L + idx[r[t]]
            off += g.size
    return root.flatten()


@pytest.mark.parametrize("kw", [dict(frame_block=2, block=1, m_size=-1), dict(frame_block=2, block=2, m_size=7),
                                dict(frame_block=3, block=2, m_size=-1, mask_row_wrap=True)])
def test_row_matching_equals_grid_matching(kw):
    from mllm_efficiency.video.layout import Grid

    g = torch.Generator().manual_seed(0)
    grids = [[Grid(2, 4, 2, 3), Grid(30, 3, 2, 2)], [Grid(5, 5, 3, 2)]]
    B, L, C = 2, 45, 16
    base = torch.randn(B, 1, C, generator=g)
    x = base + 0.3 * torch.randn(B, L, C, generator=g)  # similar rows everywhere
    x[0, 10] = 0.0  # an all-zero live token (it does not count for the tiles)
    live = torch.rand(B, L, generator=g) > 0.2
    grid = torch.full((B, L), -1, dtype=torch.long)
    for b, row in enumerate(grids):
        n = 0
        for gr in row:
            grid[b, gr.start:gr.start + gr.size] = torch.arange(n, n + gr.size)
            n += gr.size
    alive = (grid >= 0) & live
    kw = dict(kw)
    m_size = kw.pop("m_size")
    nb = S.row_neighbours(grid, alive, grids, m_size=m_size, **kw)
    for thr in (0.9, 0.95, -0.5):
        m = S.match_rows(x.reshape(B * L, C), nb, threshold=thr, m_size=m_size)
        ref = _rows_reference(x, grids, alive, threshold=thr, m_size=m_size, **kw)
        assert torch.equal(m.root, ref)
        assert int(m.removed()) == int((ref != torch.arange(B * L)).sum())
        assert int(m.removed()) > 0 or thr > 0.9


# ----------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("T", [28, 80])
def test_framefusion_budget_arithmetic(T):
    hist = [0.3, 0.2]
    s1, s2 = 0.7, 0.7 * 0.8
    share = (T * 0.3 - (s1 + s2)) / ((T - 2) * s2)
    assert math.isclose(prune_ratio(hist, T, 0.3), max(0.0, 1 - share))
    assert prune_ratio([], T, 0.3) == pytest.approx(0.7)
    assert prune_ratio([0.9, 0.9], T, 0.3) == 0.0  # merging already beat the budget


def test_framefusion_uses_the_models_layer_count(ov, ov_prompt):
    with me.apply(ov, "framefusion", similarity_lower_bound=-1.0) as h:
        _logits(ov, ov_prompt)
        n = h.stats.num_visual[0]
        # everything is a candidate: r >= p, so floor(p * n) tokens merge with p from T = 4 layers
        assert h.stats.visual_per_layer[1] == n - math.floor(prune_ratio([], 4, 0.3) * n)


def test_adaptiv_never_drops_margins_or_first_frame():
    x = torch.ones(3 * 4 * 4, 16)  # every neighbour identical: everything else is dropped
    drop = grid_drop_mask(x, 3, 4, 4, 0.5).view(3, 4, 4)
    assert not drop[0].any() and not drop[:, 0].any() and not drop[:, :, 0].any()
    assert drop[1:, 1:, 1:].all()


def test_cmc_sparsity_at_most_seven_eighths(ov, ov_prompt):
    with me.apply(ov, "cmc", fc_threshold=1e9, query_threshold=1e9) as h:
        _logits(ov, ov_prompt)
        assert h.stats.linear_sparsity == pytest.approx(7 / 8)
        assert h.stats.query_sparsity <= 7 / 8


# ----------------------------------------------------------------------------- bad hyperparameters
@pytest.mark.parametrize("name,cfg,field", [
    ("focus", dict(alpha_list=(0.4, 0.3)), "same length"),
    ("focus", dict(selected_layers=(0,), alpha_list=(1.5,)), "alpha_list[0]"),
    ("focus", dict(selected_layers=(2, 1), alpha_list=(0.5, 0.4)), "strictly increasing"),
    ("focus", dict(similarity_threshold=1.5), "similarity_threshold"),
    ("focus", dict(vector_size=-3), "vector_size"),
    ("focus", dict(block_size=1, frame_block_size=1), "block_size"),
    ("focus", dict(gemm_m_size=0), "gemm_m_size"),
    ("focus", dict(min_dedup_fraction=1.5), "min_dedup_fraction"),
    ("focus", dict(min_dedup_fraction=-0.1), "min_dedup_fraction"),
    ("focus", dict(sic_mode="fast"), "sic_mode"),
    ("framefusion", dict(cost=0.0), "cost"),
    ("adaptiv", dict(threshold=2.0), "threshold"),
    ("cmc", dict(interval_size=1), "interval_size"),
])
def test_bad_hyperparameters_are_rejected(ov, name, cfg, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        me.apply(ov, name, **cfg)


def test_selected_layer_beyond_model_is_rejected(ov):
    with pytest.raises(ConfigError, match=r"selected_layers\[1\] must be in \[0, 2\]"):
        me.apply(ov, "focus")  # default schedule (2, 5, ...) does not fit 4 layers


@pytest.mark.parametrize("cfg", [dict(selected_layers=(1,), alpha_list=(0.5,), similarity_threshold=0.3),
                                 dict(selected_layers=(0, 1), alpha_list=(0.7, 0.5), similarity_threshold=0.2,
                                      block_size=2, gemm_m_size=5)])
def test_whole_mlp_equals_gate_up_dedup(ov, ov_prompt, cfg):
    """whole_mlp runs gate, up and down on the gate/up point's unique rows once: the same output as deduplicating
    gate/up alone (down's input rows are then equal within each group), the same rows computed at gate/up, and
    down_proj credited with them; selected layers' compacted MLPs (mid_layer) included."""
    cfg = dict(cfg, sic_mode="token_dedup", min_dedup_fraction=0.0)
    vanilla = _logits(ov, ov_prompt)
    with me.apply(ov, "focus", gemms=("gate_proj",), **cfg) as h:
        ref, ref_rows = _logits(ov, ov_prompt), dict(h.stats.dedup_rows)
    calls = {"n": 0}
    with me.apply(ov, "focus", gemms=("gate_proj", "down_proj"), whole_mlp=True, **cfg) as h:
        down = h._attached.adapter.layers[2].mlp.down_proj
        hk = down.register_forward_hook(lambda m, a, o: calls.__setitem__("n", a[0].shape[1]))
        out = _logits(ov, ov_prompt)
        hk.remove()
        rows = dict(h.stats.dedup_rows)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert {k: v for k, v in rows.items() if k[0] == "gate_proj"} == ref_rows
    assert all(rows[("down_proj", l)] == v for (g, l), v in ref_rows.items())
    assert sum(t - c for c, t in ref_rows.values()) > 0
    assert calls["n"] == rows[("gate_proj", 2)][0]  # down_proj ran on the unique rows only
    assert torch.equal(_logits(ov, ov_prompt), vanilla)  # the MLP hooks are gone


def test_whole_mlp_settings_are_checked(ov):
    with pytest.raises(ConfigError, match="whole_mlp"):
        me.apply(ov, "focus", whole_mlp=True)  # emulate
    with pytest.raises(ConfigError, match="whole_mlp"):
        me.apply(ov, "focus", sic_mode="token_dedup", whole_mlp=True, gemms=("q_proj",))


def test_sec_only_is_a_deprecated_spelling_of_sic_mode_off():
    from mllm_efficiency.video.focus import FocusConfig

    with pytest.warns(DeprecationWarning, match='sic_mode="off"'):
        cfg = FocusConfig.from_kwargs("focus", sec_only=True)
    assert cfg.sic_mode == "off" and not cfg.sic_on and "sec_only" not in FocusConfig.field_names()
    with pytest.warns(DeprecationWarning):
        assert FocusConfig.from_kwargs("focus", sec_only=False).sic_mode == "emulate"
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="contradicts"):
        FocusConfig.from_kwargs("focus", sec_only=True, sic_mode="token_dedup")
