"""DivPrune, DART and PyramidDrop on the pruning engine: ratio 0 is exact, kept counts, the selection rules
against plain-Python re-derivations from the papers, left-padded batches equal single runs."""
from __future__ import annotations

import math

import pytest
import torch

import mllm_efficiency as me
from conftest import keep_rule, pad_left
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = 1e-4


def _inputs_embeds(model, prompt):
    captured = {}

    def hook(module, args, kwargs):
        captured["e"] = kwargs["inputs_embeds"]

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**prompt)
    h.remove()
    return captured["e"][0]


def _cos(a, b) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------------------- DivPrune
def _divprune_reference(feats: torch.Tensor, keep: int) -> set[int]:
    """Algorithm 1 of DivPrune, in plain Python: seed with the token whose nearest neighbour is farthest, then
    add the token maximising its minimum cosine distance to the chosen set (first index on ties)."""
    n = feats.shape[0]
    x = [feats[i].double() for i in range(n)]
    d = [[1.0 - _cos(x[i], x[j]) for j in range(n)] for i in range(n)]
    if keep >= n:
        return set(range(n))
    nearest = [min(d[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < keep:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (min(d[i][s] for s in chosen), -i)))
    return set(chosen)


@pytest.mark.parametrize("seed", range(12))
def test_max_min_diverse_matches_reference(seed):
    from mllm_efficiency.pruning.divprune import max_min_diverse

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 20, (1,), generator=g))
    feats = torch.randn(n, 6, generator=g)
    keep = int(torch.randint(1, n + 1, (1,), generator=g))
    got = max_min_diverse(feats, keep)
    assert int(got.sum()) == keep
    assert set(got.nonzero().flatten().tolist()) == _divprune_reference(feats, keep)


@torch.no_grad()
def test_divprune_ratio_zero_exact(llava, prompt2):
    base = llava(**prompt2).logits
    with me.apply(llava, "divprune", ratio=0.0) as h:
        assert torch.equal(llava(**prompt2).logits, base)
        assert h.stats.keep_count == [32]
    assert torch.equal(llava(**prompt2).logits, base)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
@torch.no_grad()
def test_divprune_kept_set_matches_reference(llava, prompt2, ratio):
    ids = prompt2["input_ids"][0]
    emb = _inputs_embeds(llava, prompt2)
    visual = (ids == IMAGE_TOKEN).nonzero().flatten()
    keep = keep_rule(32, ratio)
    expected = {int(visual[i]) for i in _divprune_reference(emb[visual].float(), keep)}
    with me.apply(llava, "divprune", ratio=ratio) as h:
        out = llava(**prompt2, use_cache=True)
        assert h.stats.keep_count == [keep] and h.stats.num_visual == [32]
        assert set(h.stats.kept_visual_positions[0].tolist()) == expected
        L = ids.shape[0]
        assert h.stats.cache_lengths == [L - 32 + keep] * len(h.stats.cache_lengths)
        gen = llava.generate(**prompt2, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == L + 3
    assert out.logits.shape[1] == L


def _batch_equals_single(model, method, **cfg):
    a_ids, a_pv = llava_prompt(1, suffix=(12, 13, 14, 15, 16), seed=1)
    b_ids, b_pv = llava_prompt(2, seed=2)
    ids, am = pad_left([a_ids, b_ids])
    with torch.no_grad(), me.apply(model, method, **cfg) as h:
        batch = model(input_ids=ids, attention_mask=am, pixel_values=torch.cat([a_pv, b_pv])).logits[:, -1]
        kept_batch = [p.tolist() for p in h.stats.kept_visual_positions]
        counts_batch = list(h.stats.keep_count)
        single_a = model(input_ids=a_ids, pixel_values=a_pv).logits[:, -1]
        kept_a, count_a = h.stats.kept_visual_positions[0].tolist(), h.stats.keep_count[0]
        single_b = model(input_ids=b_ids, pixel_values=b_pv).logits[:, -1]
        kept_b, count_b = h.stats.kept_visual_positions[0].tolist(), h.stats.keep_count[0]
    pad_a = ids.shape[1] - a_ids.shape[1]
    assert counts_batch == [count_a, count_b]
    assert [p - pad_a for p in kept_batch[0]] == kept_a and kept_batch[1] == kept_b
    assert (batch[0] - single_a[0]).abs().max() < TOL and (batch[1] - single_b[0]).abs().max() < TOL
    return h


def test_divprune_left_padded_batch_equals_single_runs(llava):
    _batch_equals_single(llava, "divprune", ratio=0.6)


def test_divprune_bad_config(llava):
    with pytest.raises(me.ConfigError):
        me.apply(llava, "divprune", ratio=1.0)
