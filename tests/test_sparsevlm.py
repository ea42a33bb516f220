"""SparseVLM on the pruning engine: ratio 0 is exact, the schedule (budgets, recycled counts, layer-averaged
tokens), the selection rules (raters, rater-attention scores, kept set, recycled tokens) against a layer-by-layer
re-derivation written here, left-padded batches equal single runs, cached decoding equals the re-derivation's
greedy tokens, and configuration errors."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import pad_left

import mllm_efficiency as me
from mllm_efficiency.adapters import get_adapter
from mllm_efficiency.errors import NoVisualTokensError
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = 1e-4


def _counts(pruned: int, recycle=0.3, cluster=0.1) -> tuple[int, int]:
    """The recycling counts of the spec, written out: m = min(P, int(0.3 P) + 1), c = min(m, int(0.1 m) + 1)."""
    if pruned <= 0 or recycle == 0:
        return 0, 0
    m = min(pruned, int(recycle * pruned) + 1)
    return m, min(m, int(cluster * m) + 1)


# ----------------------------------------------------------------------------------------- plain re-derivations
def _raters_reference(h: torch.Tensor, visual: list[int], question: list[int]) -> list[int]:
    """Question tokens whose mean (over visual tokens) softmax-over-question relevance is above the mean."""
    if not question:
        return [h.shape[0] - 1]
    x = h.double()
    rel = [0.0] * len(question)
    for v in visual:
        logits = [float(x[v] @ x[t]) for t in question]
        top = max(logits)
        e = [math.exp(z - top) for z in logits]
        s = sum(e)
        for i, z in enumerate(e):
            rel[i] += z / s / len(visual)
    mean = sum(rel) / len(rel)
    chosen = [t for t, r in zip(question, rel) if r > mean]
    return chosen or list(question)


def _dpc_reference(x: torch.Tensor, c: int) -> tuple[list[int], list[int]]:
    """DPC-KNN in plain Python: density from the c nearest (self included), delta to the nearest denser point
    (lower index wins equal densities), centers = top c of density * delta, nearest-center assignment."""
    m, d = x.shape
    x = x.double()
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(d) for j in range(m)] for i in range(m)]
    dens = [math.exp(-sum(v * v for v in sorted(dist[i])[:c]) / c) for i in range(m)]
    dmax = max(max(row) for row in dist)
    delta = []
    for i in range(m):
        higher = [dist[i][j] for j in range(m) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        delta.append(min(higher) if higher else dmax)
    centers = sorted(range(m), key=lambda i: (-dens[i] * delta[i], i))[:c]
    assign = [min(range(c), key=lambda k: (dist[i][centers[k]], k)) for i in range(m)]
    for k, i in enumerate(centers):
        assign[i] = k
    return centers, assign


@torch.no_grad()
def _reference(model, ids: torch.Tensor, pv: torch.Tensor, prompt_len: int, layers, budgets, recycle=0.3):
    """SparseVLM written out on one sample, layer by layer on the kept slots with original positions. `ids` may
    hold generated tokens after the prompt's `prompt_len`: every decision is taken on the prompt (causality makes
    the prompt rows identical), so the last row's logits are what cached decoding produces.
    Returns (raters, kept visual positions, recycled positions, last-row logits)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    text = model.model.language_model
    prompt = ids[:, :prompt_len]
    h = get_adapter(model).merged_inputs_embeds(input_ids=prompt, pixel_values=pv)
    if ids.shape[1] > prompt_len:
        h = torch.cat([h, text.embed_tokens(ids[:, prompt_len:])], 1)
    h = h[0]
    row = ids[0].tolist()
    visual = [j for j in range(prompt_len) if row[j] == IMAGE_TOKEN]
    question = list(range(visual[-1] + 1, prompt_len))
    raters = _raters_reference(h, visual, question)
    kept = list(range(len(row)))
    recycled: set[int] = set()
    qk = {}
    for i, layer in enumerate(text.layers):
        if i - 1 in layers:
            s = layers.index(i - 1)
            q, k = qk[i - 1]
            G = q.shape[0] // k.shape[0]
            k = k.repeat_interleave(G, dim=0)
            n = len(kept)
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            logits = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # (H, n, n)
            rows = [kept.index(p) for p in raters]
            score = probs.mean(0)[rows].mean(0)
            vis = [j for j, p in enumerate(kept) if p in visual]
            ranked = sorted(vis, key=lambda j: (-float(score[j]), j))
            top = min(budgets[s], len(vis))
            m, c = _counts(len(vis) - top, recycle)
            chosen = set(ranked[:top])
            if c:
                cand = ranked[top:top + m]
                centers, assign = _dpc_reference(h[cand], c)
                for kk, ci in enumerate(centers):
                    members = [cand[j] for j in range(m) if assign[j] == kk]
                    h = h.clone()
                    h[cand[ci]] = h[members].float().mean(0).to(h.dtype)
                    chosen.add(cand[ci])
                new_recycled = {kept[cand[ci]] for ci in centers}
            else:
                new_recycled = set()
            slots = [j for j in range(len(kept)) if j not in vis or j in chosen]
            kept = [kept[j] for j in slots]
            recycled = {p for p in recycled if p in kept} | new_recycled
            h = h[slots]
        pos = torch.tensor(kept).unsqueeze(0)
        x = h.unsqueeze(0)
        cos, sin = text.rotary_emb(x, pos)
        n = len(kept)
        mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        attn = layer.self_attn
        got = {}
        hq = attn.q_proj.register_forward_hook(lambda mod, a, o, got=got: got.__setitem__("q", o))
        hk = attn.k_proj.register_forward_hook(lambda mod, a, o, got=got: got.__setitem__("k", o))
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        hq.remove()
        hk.remove()
        h = (out[0] if isinstance(out, tuple) else out)[0]
        q = got["q"].view(1, n, -1, attn.head_dim).transpose(1, 2)
        k = got["k"].view(1, n, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        qk[i] = (q[0], k[0])
    logits = model.lm_head(text.norm(h))[-1]
    return set(raters), {p for p in kept if p in visual}, recycled, logits


# ----------------------------------------------------------------------------------------- unit rules
def test_schedule_helpers():
    from mllm_efficiency.pruning.sparsevlm import (
        alive_after,
        average_tokens,
        budgets_for_ratio,
        default_layers,
        recycle_counts,
    )

    assert default_layers(32) == (2, 6, 15) and default_layers(4) == (0, 1, 2) and default_layers(2) == (0,)
    assert recycle_counts(510, 0.3, 0.1) == _counts(510) == (154, 16)
    assert recycle_counts(1, 0.3, 0.1) == (1, 1) and recycle_counts(0, 0.3, 0.1) == (0, 0)
    assert recycle_counts(40, 0.0, 0.1) == (0, 0)
    # the authors' 64-token list on LLaVA-1.5: 66 + 16 recycled, 30 + 2, 17 + 1
    assert alive_after(576, (66, 30, 17), 0.3, 0.1) == [82, 32, 18]
    assert average_tokens(576, [82, 32, 18], (2, 6, 15), 32) == (3 * 576 + 4 * 82 + 9 * 32 + 16 * 18) / 32
    for r in (0.3, 0.5, 0.7, 0.85):
        budgets, lam = budgets_for_ratio(576, r, (2, 6, 15), 32, 0.3, 0.1)
        got = average_tokens(576, alive_after(576, budgets, 0.3, 0.1), (2, 6, 15), 32)
        assert abs(got - (1 - r) * 576) < 1.0, (r, budgets, got)
        assert list(budgets) == sorted(budgets, reverse=True) and 0 < lam < 1
    assert budgets_for_ratio(576, 0.0, (2, 6, 15), 32, 0.3, 0.1) == ((576, 576, 576), 1.0)


@pytest.mark.parametrize("seed", range(10))
def test_density_peak_clusters_match_reference(seed):
    from mllm_efficiency.pruning.sparsevlm import density_peak_clusters, merge_clusters

    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 25, (1,), generator=g))
    x = torch.randn(m, 8, generator=g)
    c = int(torch.randint(1, m + 1, (1,), generator=g))
    centers, assign = density_peak_clusters(x, c)
    ref_centers, ref_assign = _dpc_reference(x, c)
    assert centers.tolist() == ref_centers and assign.tolist() == ref_assign
    merged = merge_clusters(x, assign, c)
    for k in range(c):
        members = [i for i in range(m) if ref_assign[i] == k]
        torch.testing.assert_close(merged[k], x[members].mean(0))


def test_raters_match_reference(llava):
    from mllm_efficiency.pruning.sparsevlm import select_raters

    for seed, suffix in ((1, (12, 13, 14, 15, 16, 17)), (2, (40,)), (3, (50, 51, 52, 53))):
        ids, pv = llava_prompt(2, suffix=suffix, seed=seed)
        with torch.no_grad():
            h = get_adapter(llava).merged_inputs_embeds(input_ids=ids, pixel_values=pv)
        vis = ids[0] == IMAGE_TOKEN
        visual = vis.nonzero().flatten().tolist()
        L, tq = ids.shape[1], len(suffix)
        text = torch.ones(1, tq, dtype=torch.bool)
        got = select_raters(h, vis.unsqueeze(0), text)[0]
        expected = _raters_reference(h[0], visual, list(range(L - tq, L)))
        assert {L - tq + i for i in got.nonzero().flatten().tolist()} == set(expected)


# ----------------------------------------------------------------------------------------- on the model
@torch.no_grad()
def test_ratio_zero_exact(llava, prompt2):
    base = llava(**prompt2).logits
    with me.apply(llava, "sparsevlm", ratio=0.0) as h:
        assert torch.equal(llava(**prompt2).logits, base)
        assert h.stats.keep_count == [32]
    assert torch.equal(llava(**prompt2).logits, base)


@pytest.mark.parametrize("cfg,layers,budgets", [
    (dict(sparse_token_list=(20, 10, 5)), (0, 1, 2), (20, 10, 5)),
    (dict(pruning_loc=(1, 2), sparse_token_list=(30, 3)), (1, 2), (30, 3)),
    (dict(retained_tokens=192, pruning_loc=(0, 1, 2)), (0, 1, 2), (25, 17, 9)),  # 300, 200, 110 scaled by 48/576
    (dict(pruning_loc=(1,), sparse_token_list=(40,), recycle_ratio=0.0), (1,), (40,)),
])
@torch.no_grad()
def test_kept_counts_and_selection_match_reference(llava, prompt3, cfg, layers, budgets):
    ids, pv = prompt3["input_ids"], prompt3["pixel_values"]
    L = ids.shape[1]
    raters, expected, recycled, ref_logits = _reference(llava, ids, pv, L, list(layers), list(budgets),
                                                         cfg.get("recycle_ratio", 0.3))
    alive, before, stage_counts, stage_recycled = 48, [48], [], []
    for k in budgets:
        k = min(k, alive)
        c = _counts(alive - k, cfg.get("recycle_ratio", 0.3))[1]
        alive = k + c
        stage_counts.append([alive])
        stage_recycled.append([c])
        before.append(alive)
    with me.apply(llava, "sparsevlm", **cfg) as h:
        out = llava(**prompt3, use_cache=True).logits[0, -1]
        st = h.stats
        assert st.pruning_loc == layers and st.sparse_token_list == [list(budgets)]
        assert st.stage_keep_counts == stage_counts and st.recycled_counts == stage_recycled
        assert st.keep_count == [alive] and st.num_visual == [48]
        assert set(st.rater_mask[0].nonzero().flatten().tolist()) == raters
        assert set(st.kept_visual_positions[0].tolist()) == expected
        assert set(st.recycled_mask[0].nonzero().flatten().tolist()) == recycled
        # layer i stores the prompt minus the visual tokens removed before it
        stored = [L - 48 + before[sum(1 for l in layers if l < i)] for i in range(4)]
        assert st.cache_lengths == stored
    torch.testing.assert_close(out, ref_logits, atol=TOL, rtol=0)


@torch.no_grad()
def test_ratio_sets_schedule(llava, prompt3):
    from mllm_efficiency.pruning.sparsevlm import alive_after, average_tokens

    with me.apply(llava, "sparsevlm", ratio=0.5) as h:
        llava(**prompt3)
        st = h.stats
        budgets = st.sparse_token_list[0]
        assert [c[0] for c in st.stage_keep_counts] == alive_after(48, budgets, 0.3, 0.1)
        assert abs(average_tokens(48, alive_after(48, budgets, 0.3, 0.1), (0, 1, 2), 4) - 24) < 1.0
        assert 0 < st.lambda_ < 1
    with me.apply(llava, "sparsevlm") as h:  # default 0.778, capped at 0.75 on a 4-layer model
        llava(**prompt3)
        assert h.stats.sparse_token_list == [[1, 1, 1]]


@torch.no_grad()
def test_cached_generate_equals_reference(llava, prompt3):
    ids, pv = prompt3["input_ids"], prompt3["pixel_values"]
    L = ids.shape[1]
    budgets = (20, 10, 5)
    with me.apply(llava, "sparsevlm", sparse_token_list=budgets):
        gen = llava.generate(**prompt3, max_new_tokens=4, do_sample=False)
    seq = ids
    for _ in range(4):
        logits = _reference(llava, seq, pv, L, [0, 1, 2], list(budgets))[3]
        seq = torch.cat([seq, logits.argmax().view(1, 1)], 1)
    assert torch.equal(gen, seq)


@pytest.mark.parametrize("cfg", [dict(ratio=0.6), dict(sparse_token_list=(12, 6, 3)),
                                 dict(ratio=0.5, positions="renumber")])
def test_left_padded_batch_equals_single_runs(llava, cfg):
    a_ids, a_pv = llava_prompt(1, suffix=(12, 13, 14, 15, 16), seed=1)
    b_ids, b_pv = llava_prompt(2, seed=2)
    ids, am = pad_left([a_ids, b_ids])
    with torch.no_grad(), me.apply(llava, "sparsevlm", **cfg) as h:
        pos = (am.cumsum(-1) - 1).clamp_min(0)
        batch = llava(input_ids=ids, attention_mask=am, position_ids=pos,
                      pixel_values=torch.cat([a_pv, b_pv])).logits[:, -1]
        st = h.stats
        kept_batch = [p.tolist() for p in st.kept_visual_positions]
        rec_batch = [r.nonzero().flatten().tolist() for r in st.recycled_mask]
        counts_batch = [list(c) for c in st.stage_keep_counts]
        singles = []
        for i, p in ((a_ids, a_pv), (b_ids, b_pv)):
            logits = llava(input_ids=i, pixel_values=p).logits[:, -1]
            singles.append((logits, st.kept_visual_positions[0].tolist(),
                            st.recycled_mask[0].nonzero().flatten().tolist(), [c[0] for c in st.stage_keep_counts]))
    pad_a = ids.shape[1] - a_ids.shape[1]
    assert [[c[b] for c in counts_batch] for b in range(2)] == [singles[0][3], singles[1][3]]
    assert [p - pad_a for p in kept_batch[0]] == singles[0][1] and kept_batch[1] == singles[1][1]
    assert [p - pad_a for p in rec_batch[0]] == singles[0][2] and rec_batch[1] == singles[1][2]
    for b in range(2):
        assert (batch[b] - singles[b][0][0]).abs().max() < TOL


@torch.no_grad()
def test_generate_runs_and_removes(llava, prompt2):
    base = llava(**prompt2).logits
    with me.apply(llava, "sparsevlm", ratio=0.6, positions="renumber"):
        out = llava.generate(**prompt2, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == prompt2["input_ids"].shape[1] + 3
    assert torch.equal(llava(**prompt2).logits, base)


def test_renumber_falls_back_from_the_fast_path(llava, prompt2):
    from mllm_efficiency.adapters import get_adapter as adapter_of
    from mllm_efficiency.fast.support import unsupported_reason

    with me.apply(llava, "sparsevlm", ratio=0.5, positions="renumber"):
        reason = unsupported_reason(llava, adapter_of(llava), llava.lm_head)
        assert "sparsevlm" in reason and "renumber" in reason
        ref = llava.generate(**prompt2, max_new_tokens=3, do_sample=False)
        assert torch.equal(me.generate(llava, max_new_tokens=3, **prompt2), ref)
    with me.apply(llava, "sparsevlm", ratio=0.5):
        assert unsupported_reason(llava, adapter_of(llava), llava.lm_head) is None


@pytest.mark.parametrize("bad", [
    dict(ratio=1.0), dict(ratio=-0.1), dict(ratio=0.8),  # 0.8: beyond 1 - 1/4 with pruning_loc starting at 0
    dict(pruning_loc=(2, 1)), dict(pruning_loc=(1, 3)), dict(pruning_loc=()), dict(pruning_loc=(-1,)),
    dict(sparse_token_list=(5, 10, 2)), dict(sparse_token_list=(0, 0, 0)), dict(sparse_token_list=(5, 4)),
    dict(sparse_token_list=(5, 4, 3), retained_tokens=64), dict(retained_tokens=96),
    dict(retained_tokens=64, pruning_loc=(1, 2)), dict(recycle_ratio=1.5), dict(cluster_ratio=0.0),
    dict(positions="contiguous"), dict(pruning_loc=3), dict(allow_text_only="yes"),
])
def test_bad_config(llava, bad):
    with pytest.raises(me.ConfigError):
        me.apply(llava, "sparsevlm", **bad)


@torch.no_grad()
def test_text_only_prompt(llava):
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    with me.apply(llava, "sparsevlm", ratio=0.5), pytest.raises(NoVisualTokensError):
        llava(input_ids=ids)
    base = llava(input_ids=ids).logits
    with me.apply(llava, "sparsevlm", ratio=0.5, allow_text_only=True):
        assert torch.equal(llava(input_ids=ids).logits, base)
