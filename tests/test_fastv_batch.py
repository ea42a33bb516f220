"""Batches: per-sample visual sets, keep counts and kept sets, left padding, ragged pruned lengths.

A batch of 2 prompts with different numbers of images (N = 16 and N = 32) and different lengths, left
padded with pad id 0 (attention_mask zeros on the left), must give each sample the same result as its
bs=1 run. For a plain forward the caller passes position_ids = cumsum(mask) - 1 (generate does this itself).
"""
from __future__ import annotations

import pytest
import torch

from conftest import NUM_LAYERS, apply_quiet, cache_of, greedy, keep_rule, pad_left
from mllm_efficiency.testing import llava_prompt

TOL = 1e-4


@pytest.fixture(scope="module")
def samples():
    a_ids, a_pv = llava_prompt(num_images=1, seed=11, prefix=(1, 10, 11, 15, 16, 17))
    b_ids, b_pv = llava_prompt(num_images=2, seed=12, suffix=(12, 13, 14, 30))
    return [dict(input_ids=a_ids, pixel_values=a_pv), dict(input_ids=b_ids, pixel_values=b_pv)]


@pytest.fixture(scope="module")
def batch(samples):
    ids, am = pad_left([s["input_ids"] for s in samples])
    pv = torch.cat([s["pixel_values"] for s in samples])
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv)


def positions(batch):
    return (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)


def test_batch_shapes(samples, batch):
    """Sanity of the fixture: different lengths, the shorter one left padded, 16 and 32 image tokens."""
    assert [s["input_ids"].shape[1] for s in samples] == [25, 41]
    assert batch["input_ids"].shape == (2, 41)
    assert batch["attention_mask"][0, :16].sum() == 0 and batch["attention_mask"][0, 16:].all()


def test_unmodified_batch_equals_single(llava, samples, batch):
    """Baseline: without FastV the padded batch reproduces the single runs (so the FastV tests are meaningful)."""
    out = llava(**batch, position_ids=positions(batch)).logits
    for b, s in enumerate(samples):
        torch.testing.assert_close(out[b, -1], llava(**s).logits[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75), (3, 0.25), (2, 0.9)])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_batch_logits_equal_single_runs(request, samples, batch, k, ratio, backend):
    model = request.getfixturevalue("llava" if backend == "sdpa" else "llava_eager")
    L = batch["input_ids"].shape[1]
    with apply_quiet(model, k=k, ratio=ratio) as h:
        single, kept_single = [], []
        for s in samples:
            single.append(model(**s).logits[0, -1])
            kept_single.append(h.stats.kept_visual_positions[0])
        out = model(**batch, position_ids=positions(batch), use_cache=True)
        st = h.stats
    assert st.num_visual == [16, 32]
    assert st.keep_count == [keep_rule(16, ratio), keep_rule(32, ratio)]
    for b, s in enumerate(samples):
        pad = L - s["input_ids"].shape[1]
        assert st.kept_visual_positions[b].tolist() == (kept_single[b] + pad).tolist()
        torch.testing.assert_close(out.logits[b, -1], single[b], atol=TOL, rtol=0)
    assert out.logits.shape == (2, L, 128)
    # ragged pruned lengths: the cache of layers >= K holds the longest sample's kept slots
    kept_len = [L - 16 + keep_rule(16, ratio), L - 32 + keep_rule(32, ratio)]
    cache = cache_of(out)
    assert [cache.get_seq_length(i) for i in range(NUM_LAYERS)] == [L] * k + [max(kept_len)] * (NUM_LAYERS - k)


@pytest.mark.parametrize("k,ratio,backend", [(1, 0.5, "sdpa"), (2, 0.75, "sdpa"), (3, 0.9, "sdpa"),
                                              (2, 0.75, "eager")])
def test_batch_generate_equals_single_runs(request, samples, batch, k, ratio, backend):
    n = 4
    model = request.getfixturevalue("llava" if backend == "sdpa" else "llava_eager")
    with apply_quiet(model, k=k, ratio=ratio):
        single = [greedy(model, n, **s) for s in samples]
        batched = greedy(model, n, **batch)
    for b in range(2):
        assert batched[b].tolist() == single[b][0].tolist()


def test_batch_generate_mask_mode_equals_single_runs(llava, samples, batch):
    with apply_quiet(llava, k=2, ratio=0.75, mode="mask"):
        single = [greedy(llava, 4, **s) for s in samples]
        batched = greedy(llava, 4, **batch)
    for b in range(2):
        assert batched[b].tolist() == single[b][0].tolist()


@pytest.mark.parametrize("cfg", [dict(scorer="all_rows"), dict(scorer="text_rows"), dict(grouping="per_span"),
                                 dict(positions="renumber")])
def test_batch_variants_equal_single_runs(llava, samples, batch, cfg):
    """Scorers with several rows, per-span quotas and renumbered positions stay per-sample in a batch."""
    with apply_quiet(llava, k=2, ratio=0.75, **cfg) as h:
        single, kept = [], []
        for s in samples:
            single.append(llava(**s).logits[0, -1])
            kept.append(h.stats.kept_visual_positions[0])
        out = llava(**batch, position_ids=positions(batch)).logits
        L = batch["input_ids"].shape[1]
        for b, s in enumerate(samples):
            pad = L - s["input_ids"].shape[1]
            assert h.stats.kept_visual_positions[b].tolist() == (kept[b] + pad).tolist()
            torch.testing.assert_close(out[b, -1], single[b], atol=TOL, rtol=0)
        gen = greedy(llava, 3, **batch)
        for b, s in enumerate(samples):
            assert gen[b].tolist() == greedy(llava, 3, **s)[0].tolist()


def test_batch_with_a_text_only_sample(llava, samples):
    """A sample without image tokens passes through unchanged while its neighbour is pruned."""
    text = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    ids, am = pad_left([samples[1]["input_ids"], text])
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=samples[1]["pixel_values"])
    pos = positions(batch)
    base_text = llava(input_ids=text).logits[0, -1]
    with apply_quiet(llava, k=2, ratio=0.75) as h:
        pruned_img = llava(**samples[1]).logits[0, -1]
        out = llava(**batch, position_ids=pos).logits
        assert h.stats.num_visual == [32, 0]
    torch.testing.assert_close(out[0, -1], pruned_img, atol=TOL, rtol=0)
    torch.testing.assert_close(out[1, -1], base_text, atol=TOL, rtol=0)


def test_batch_random_scorer_k0(llava, samples, batch):
    """K = 0 in a batch: each sample keeps its own count, outputs stay finite, generate runs."""
    with apply_quiet(llava, k=0, ratio=0.5, scorer="random") as h:
        out = llava(**batch, position_ids=positions(batch), use_cache=True)
        assert h.stats.keep_count == [8, 16]
        assert [len(p) for p in h.stats.kept_visual_positions] == [8, 16]
        assert torch.isfinite(out.logits[:, -1]).all()
        assert greedy(llava, 3, **batch).shape == (2, 3)


def test_right_padding_raises(llava, samples, attach):
    a, b = samples[0]["input_ids"], samples[1]["input_ids"]
    n = b.shape[1] - a.shape[1]
    ids = torch.cat([torch.cat([a, torch.zeros(1, n, dtype=torch.long)], 1), b])
    am = torch.ones_like(ids)
    am[0, a.shape[1]:] = 0
    pv = torch.cat([samples[0]["pixel_values"], samples[1]["pixel_values"]])
    attach(llava, k=2, ratio=0.5)
    with pytest.raises(ValueError, match="(?i)right padding"):
        llava(input_ids=ids, attention_mask=am, pixel_values=pv)
    with pytest.raises(ValueError, match="(?i)right padding"):
        llava.generate(input_ids=ids, attention_mask=am, pixel_values=pv, max_new_tokens=2)


def test_beam_search_inplace_equals_mask(llava, samples):
    """Beam search reorders / repeats the pruned cache per beam (batch_repeat_interleave, reorder)."""
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False, num_return_sequences=2)
    with apply_quiet(llava, k=2, ratio=0.75):
        a = llava.generate(**samples[1], **kw)
    with apply_quiet(llava, k=2, ratio=0.75, mode="mask"):
        b = llava.generate(**samples[1], **kw)
    assert torch.equal(a, b)


def test_batch_pruned_length_excludes_padding(llava, samples, batch, attach):
    h = attach(llava, k=2, ratio=0.75)
    llava(**batch, position_ids=positions(batch))
    expected = [s["input_ids"].shape[1] - n + keep_rule(n, 0.75) for s, n in zip(samples, (16, 32))]
    assert h.stats.pruned_length == expected  # [25 - 16 + 4, 41 - 32 + 8] = [13, 17]
