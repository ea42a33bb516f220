"""FastV behaviour on tiny models: identity at ratio 0, inplace == mask, keep counts, per-layer cache
lengths, decoding with a pruned cache, scorers and grouping, text-only decoders with a given span.
(The comparisons against the independent reference implementation are in test_fastv_reference.py.)
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import mllm_efficiency as me
from conftest import CACHE_KW, NUM_LAYERS, apply_quiet, cache_of, greedy, keep_rule, pad_left, text_impl
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt, tiny_llava

KR = [(1, 0.5), (2, 0.25), (2, 0.75), (3, 0.5), (3, 0.9)]


def visual_positions(inputs):
    return torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN).flatten().tolist()


# ------------------------------------------------------------------------------------------ ratio 0 / removal
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_ratio_zero_is_bit_identical(request, backend, prompt2):
    """R = 0: nothing is substituted, logits are bit-identical (forward, cached forward, generate)."""
    model = request.getfixturevalue("llava" if backend == "sdpa" else "llava_eager")
    base = model(**prompt2).logits
    base_gen = greedy(model, **prompt2)
    with apply_quiet(model, k=2, ratio=0.0) as h:
        assert text_impl(model) != backend  # the wrapper is installed...
        assert torch.equal(model(**prompt2).logits, base)  # ...and changes nothing
        assert torch.equal(model(**prompt2, use_cache=True).logits, base)
        assert torch.equal(greedy(model, **prompt2), base_gen)
        assert h.stats.keep_count == [32] and h.stats.num_visual == [32]
    assert text_impl(model) == backend


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_ratio_zero_bit_identical_with_left_padding(request, backend, prompt1, prompt2):
    """R = 0 on a left-padded batch: the wrapper's mask function must match the backend's (see
    docs/architecture.md, Seams: an unregistered mask gives wrong results with padding)."""
    model = request.getfixturevalue("llava" if backend == "sdpa" else "llava_eager")
    ids, am = pad_left([prompt1["input_ids"], prompt2["input_ids"]])
    pv = torch.cat([prompt1["pixel_values"], prompt2["pixel_values"]])
    inputs = dict(input_ids=ids, attention_mask=am, pixel_values=pv)
    base = model(**inputs).logits
    base_gen = greedy(model, 3, **inputs)
    with apply_quiet(model, k=1, ratio=0.0):
        assert torch.equal(model(**inputs).logits, base)
        assert torch.equal(greedy(model, 3, **inputs), base_gen)


def test_keep_equals_n_is_identity(llava, prompt1):
    """A ratio so small that keep == N (round(16 * 0.99) = 16) also leaves the model untouched."""
    base = llava(**prompt1).logits
    with apply_quiet(llava, k=2, ratio=0.01) as h:
        assert torch.equal(llava(**prompt1).logits, base)
        assert h.stats.keep_count == [16]


def test_remove_restores_bit_identity(llava, llava_eager, prompt1):
    for model, impl in [(llava, "sdpa"), (llava_eager, "eager")]:
        base = model(**prompt1).logits
        vision_impl = model.config.vision_config._attn_implementation
        h = apply_quiet(model, k=2, ratio=0.75)
        assert not torch.equal(model(**prompt1).logits, base)  # pruning is active
        assert model.config.vision_config._attn_implementation == vision_impl  # vision tower untouched
        h.remove()
        h.remove()  # safe twice
        assert not h.active
        assert model.config.text_config._attn_implementation == impl
        assert torch.equal(model(**prompt1).logits, base)
        assert torch.equal(model(**prompt1, use_cache=True).logits, base)


def test_context_manager_removes(llava, prompt1):
    base = llava(**prompt1).logits
    with apply_quiet(llava, k=1, ratio=0.5) as h:
        assert h.active
        assert not torch.equal(llava(**prompt1).logits, base)
    assert not h.active
    assert text_impl(llava) == "sdpa"
    assert torch.equal(llava(**prompt1).logits, base)


def test_context_manager_removes_on_exception(llava, prompt1):
    base = llava(**prompt1).logits
    with pytest.raises(RuntimeError, match="boom"):
        with apply_quiet(llava, k=1, ratio=0.5):
            raise RuntimeError("boom")
    assert text_impl(llava) == "sdpa"
    assert torch.equal(llava(**prompt1).logits, base)


def test_failed_forward_leaves_model_usable(llava, prompt1, attach):
    """A NoVisualTokensError inside a forward must not leave stale request state behind."""
    h = attach(llava, k=2, ratio=0.5)
    with pytest.raises(me.NoVisualTokensError):
        llava(input_ids=torch.tensor([[1, 5, 6, 7]]))
    out = llava(**prompt1)
    assert out.logits.shape == (1, 22, 128)
    assert h.stats.keep_count == [8]


# ------------------------------------------------------------------------------------------ inplace vs mask
@pytest.mark.parametrize("k,ratio", KR)
def test_inplace_equals_mask_logits(llava, prompt2, k, ratio):
    """Same kept set -> the last-token logits of both modes agree (mask mode keeps dropped rows)."""
    with apply_quiet(llava, k=k, ratio=ratio, mode="inplace") as h:
        a = llava(**prompt2).logits[0, -1]
        kept_a = h.stats.kept_visual_positions[0]
    with apply_quiet(llava, k=k, ratio=ratio, mode="mask") as h:
        b = llava(**prompt2).logits[0, -1]
        kept_b = h.stats.kept_visual_positions[0]
    assert torch.equal(kept_a, kept_b)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k,ratio", [(1, 0.75), (2, 0.5), (3, 0.75)])
def test_inplace_equals_mask_generate(llava, prompt1, k, ratio):
    with apply_quiet(llava, k=k, ratio=ratio, mode="inplace"):
        a = greedy(llava, 5, **prompt1)
    with apply_quiet(llava, k=k, ratio=ratio, mode="mask"):
        b = greedy(llava, 5, **prompt1)
    assert torch.equal(a, b)


def test_mask_mode_warns_no_speedup(llava):
    with pytest.warns(UserWarning, match="speedup"):
        h = me.apply(llava, "fastv", k=2, ratio=0.5, mode="mask")
    h.remove()


def test_mask_mode_keeps_full_cache(llava, prompt1, attach):
    """Mask mode removes nothing: every layer caches all L tokens."""
    h = attach(llava, k=2, ratio=0.75, mode="mask")
    out = llava(**prompt1, use_cache=True)
    assert [cache_of(out).layers[i].keys.shape[-2] for i in range(NUM_LAYERS)] == [22] * NUM_LAYERS
    assert h.stats.keep_count == [4]


def test_pruning_changes_output(llava, prompt1):
    """Guard against a no-op implementation: R > 0 changes the logits."""
    base = llava(**prompt1).logits[0, -1]
    with apply_quiet(llava, k=2, ratio=0.75):
        pruned = llava(**prompt1).logits[0, -1]
    assert (base - pruned).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ keep counts
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("num_images", [1, 3])
def test_kept_count_llava(llava, num_images, ratio, attach, request):
    inputs = request.getfixturevalue("prompt1" if num_images == 1 else "prompt3")
    N = 16 * num_images
    L = inputs["input_ids"].shape[1]
    h = attach(llava, k=2, ratio=ratio)
    out = llava(**inputs, use_cache=True)
    keep = keep_rule(N, ratio)
    assert h.stats.num_visual == [N]
    assert h.stats.keep_count == [keep]
    assert h.stats.sequence_length == L
    if keep < N:
        kept = h.stats.kept_visual_positions[0]
        assert kept.numel() == keep
        assert set(kept.tolist()) <= set(visual_positions(inputs))
        assert kept.tolist() == sorted(kept.tolist())
        assert h.stats.pruned_length == [L - N + keep]
        assert cache_of(out).layers[NUM_LAYERS - 1].keys.shape[-2] == L - N + keep


def test_kept_count_single_image_token():
    """N = 1 (an 8x8 image gives one token): keep is clamped to 1 for every ratio, so nothing is dropped."""
    model = tiny_llava(num_layers=NUM_LAYERS, image_size=8)
    ids, pv = llava_prompt(tokens_per_image=1, image_size=8)
    base = model(input_ids=ids, pixel_values=pv).logits
    for ratio in (0.5, 0.9):
        with apply_quiet(model, k=2, ratio=ratio) as h:
            assert torch.equal(model(input_ids=ids, pixel_values=pv).logits, base)
            assert h.stats.num_visual == [1] and h.stats.keep_count == [1]


@pytest.mark.parametrize("n,ratio,expected", [
    (576, 0.25, 432), (576, 0.5, 288), (576, 0.75, 144), (576, 0.9, 58),
    (575, 0.5, 288), (575, 0.75, 144), (5, 0.5, 2), (7, 0.5, 4), (1, 0.75, 1), (2880, 0.9, 288),
])
def test_keep_rule_table(n, ratio, expected):
    """The rule itself, with Python's round (ties to even: 2.5 -> 2, 3.5 -> 4) and the clamp to 1."""
    assert keep_rule(n, ratio) == expected


@pytest.mark.parametrize("n,ratio", [(5, 0.5), (7, 0.5), (575, 0.5), (576, 0.9), (2880, 0.9)])
def test_kept_count_text_model_with_span(llama_text, attach, n, ratio):
    """Large and tie-rounding N through a text-only Llama with an explicit span (no vision tower cost)."""
    start = 2
    L = start + n + 4
    ids = torch.randint(3, 120, (1, L), generator=torch.Generator().manual_seed(n))
    h = attach(llama_text, k=1, ratio=ratio, image_token_start_index=start, image_token_length=n)
    out = llama_text(input_ids=ids, use_cache=True)
    keep = keep_rule(n, ratio)
    assert h.stats.num_visual == [n] and h.stats.keep_count == [keep]
    kept = h.stats.kept_visual_positions[0]
    assert kept.numel() == keep and int(kept.min()) >= start and int(kept.max()) < start + n
    assert h.stats.cache_lengths == [L] + [L - n + keep] * (NUM_LAYERS - 1)
    assert out.logits.shape == (1, L, 128)


def test_two_images_rank_across_both(llava, prompt2, attach):
    """Global grouping: one quota over both images (text between them kept), not a per-image quota."""
    h = attach(llava, k=2, ratio=0.75)
    llava(**prompt2)
    kept = h.stats.kept_visual_positions[0].tolist()
    assert len(kept) == keep_rule(32, 0.75) == 8
    assert set(kept) <= set(range(3, 19)) | set(range(21, 37))
    assert h.stats.pruned_length == [40 - 32 + 8]  # 3 prefix + 2 between + 3 suffix text tokens all kept


def test_per_span_grouping_counts(llava, prompt3, attach):
    """per_span at R = 0.9: each 16-token image keeps round(1.6) = 2 (6 in all), global would keep 5."""
    h = attach(llava, k=2, ratio=0.9, grouping="per_span")
    llava(**prompt3)
    kept = h.stats.kept_visual_positions[0].tolist()
    spans = [range(3, 19), range(21, 37), range(39, 55)]
    assert [sum(p in s for p in kept) for s in spans] == [2, 2, 2]
    assert h.stats.keep_count == [6]
    h.remove()
    h = attach(llava, k=2, ratio=0.9)
    llava(**prompt3)
    assert h.stats.keep_count == [5] and len(h.stats.kept_visual_positions[0]) == 5


@pytest.mark.parametrize("scorer", ["all_rows", "text_rows", "random"])
def test_other_scorers_keep_right_count(llava, prompt2, attach, scorer):
    h = attach(llava, k=2, ratio=0.5, scorer=scorer)
    out = llava(**prompt2, use_cache=True)
    assert h.stats.keep_count == [16]
    assert len(h.stats.kept_visual_positions[0]) == 16
    assert h.stats.cache_lengths == [40, 40, 24, 24]
    assert out.logits.shape == (1, 40, 128)
    assert torch.isfinite(out.logits[0, -1]).all()


def test_random_scorer_is_seeded(llava, prompt2):
    kept = []
    for seed in (0, 0, 1):
        with apply_quiet(llava, k=1, ratio=0.5, scorer="random", seed=seed) as h:
            llava(**prompt2)
            kept.append(h.stats.kept_visual_positions[0].tolist())
    assert kept[0] == kept[1]
    assert kept[0] != kept[2]


# ------------------------------------------------------------------------------------------ caches
@pytest.mark.parametrize("k", [0, 1, 2, NUM_LAYERS - 1])
def test_cache_lengths_per_layer(llava, prompt1, attach, k):
    """Layers < K cache all L tokens, layers >= K only the kept ones (each layer its own K/V)."""
    h = attach(llava, k=k, ratio=0.75, scorer="random" if k == 0 else "last_row")
    out = llava(**prompt1, use_cache=True)
    L, short = 22, 22 - 16 + 4
    expected = [L] * k + [short] * (NUM_LAYERS - k)
    cache = cache_of(out)
    assert [cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)] == expected
    assert [cache.layers[i].values.shape[-2] for i in range(NUM_LAYERS)] == expected
    assert [cache.get_seq_length(i) for i in range(NUM_LAYERS)] == expected
    assert h.stats.cache_lengths == expected
    assert h.stats.pruned_length == [short]
    assert isinstance(cache, me.TrackedCache) and cache.logical_length == L  # tokens seen, not stored


@pytest.mark.parametrize("k", [0, 1, 2, NUM_LAYERS - 1])
def test_cache_lengths_after_generate(llava, prompt1, attach, k):
    """After generate, every layer holds its prefill length plus the generated tokens; the stats keep the
    prefill lengths."""
    n = 4
    h = attach(llava, k=k, ratio=0.5, scorer="random" if k == 0 else "last_row")
    gen = llava.generate(**prompt1, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True)
    cache = gen.past_key_values if getattr(gen, "past_key_values", None) is not None else gen.cache
    L, short = 22, 22 - 8
    assert h.stats.cache_lengths == [L] * k + [short] * (NUM_LAYERS - k)
    # the last generated token is not fed back, so n - 1 tokens were appended after the prefill
    assert [cache.get_seq_length(i) for i in range(NUM_LAYERS)] == [L + n - 1] * k + [short + n - 1] * (NUM_LAYERS - k)


@pytest.mark.parametrize("k", [0, 1, 2, NUM_LAYERS - 1])
def test_generate_with_cache_equals_mask_mode(llava, prompt2, k):
    """Cached decoding on the short cache equals the mask-mode run (nothing removed, dropped keys hidden)."""
    scorer = "random" if k == 0 else "last_row"
    with apply_quiet(llava, k=k, ratio=0.75, scorer=scorer):
        a = greedy(llava, 5, **prompt2)
    with apply_quiet(llava, k=k, ratio=0.75, scorer=scorer, mode="mask"):
        b = greedy(llava, 5, **prompt2)
    assert torch.equal(a, b)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_random_scorer_cache_equals_no_cache(llava, prompt1, k):
    """scorer='random': the seeded draw makes the kept set the same at every forward, so generating
    with a cache (prune once in prefill, static) equals generating without one (every step a new prefill)."""
    with apply_quiet(llava, k=k, ratio=0.5, scorer="random"):
        a = greedy(llava, 5, **prompt1)
        b = greedy(llava, 5, **prompt1, use_cache=False)
    assert torch.equal(a, b)


def test_last_row_cache_vs_no_cache_first_token(llava, prompt1):
    """scorer='last_row': with a cache the kept set is fixed at prefill (static); without a cache every
    step re-scores with the newest token's row ("dynamic" FastV), so the kept set can change after the
    first step. The two coincide only for the first generated token; later tokens may differ."""
    with apply_quiet(llava, k=2, ratio=0.75):
        a = greedy(llava, 4, **prompt1)
        b = greedy(llava, 4, **prompt1, use_cache=False)
    assert a[0, 0] == b[0, 0]


def test_logits_shape_kept_when_pruned(llava, prompt1, prompt2, attach):
    h = attach(llava, k=1, ratio=0.75)
    for inputs, L in [(prompt1, 22), (prompt2, 40)]:
        out = llava(**inputs)
        assert out.logits.shape == (1, L, 128)
        kept = set(h.stats.kept_visual_positions[0].tolist())
        dropped = [p for p in visual_positions(inputs) if p not in kept]
        assert dropped and torch.equal(out.logits[0, dropped], torch.zeros(len(dropped), 128))
        text = [p for p in range(L) if p not in visual_positions(inputs)]
        assert (out.logits[0, text].abs().sum(-1) > 0).all()


def test_prefills_counter(llava, prompt1, attach):
    h = attach(llava, k=2, ratio=0.5)
    llava(**prompt1)
    assert h.stats.prefills == 1
    greedy(llava, 3, **prompt1)  # one prefill, decode steps are not prefills
    assert h.stats.prefills == 2


def test_hidden_states_shape(llava, prompt1, attach):
    """Intermediate hidden states are returned as computed: full length before K, short after."""
    attach(llava, k=2, ratio=0.75)
    out = llava(**prompt1, output_hidden_states=True)
    lengths = [hs.shape[1] for hs in out.hidden_states]
    assert lengths[0] == 22 and lengths[2] == 22 and min(lengths) == 10
    assert out.logits.shape == (1, 22, 128)


def test_static_cache_raises(llava, prompt1, attach):
    from transformers import StaticCache

    attach(llava, k=2, ratio=0.5)
    with pytest.raises(NotImplementedError, match="(?i)cache"):
        llava(**prompt1, **{CACHE_KW: StaticCache(config=llava.config, max_cache_len=64)}, use_cache=True)
    with pytest.raises(NotImplementedError, match="(?i)cache"):
        llava.generate(**prompt1, max_new_tokens=2, cache_implementation="static")


def test_user_dynamic_cache_is_filled(llava, prompt1, attach):
    """Regression: a caller's own DynamicCache must receive the pruned prefill (an earlier version swapped
    in a fresh TrackedCache, left the caller's object empty, and the next step of the usual manual loop
    restarted as a 1-token prefill -> NoVisualTokensError). The loop's tokens equal generate's."""
    attach(llava, k=2, ratio=0.75)
    expected = greedy(llava, 4, **prompt1)
    cache = DynamicCache()
    out = llava(**prompt1, **{CACHE_KW: cache}, use_cache=True)
    assert [cache.get_seq_length(i) for i in range(NUM_LAYERS)] == [22, 22, 10, 10]
    tokens = []
    for _ in range(4):
        tok = out.logits[:, -1:].argmax(-1)
        tokens.append(int(tok))
        out = llava(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
    assert tokens == expected[0].tolist()
    assert [cache.get_seq_length(i) for i in range(NUM_LAYERS)] == [26, 26, 14, 14]


# ------------------------------------------------------------------------------------------ Qwen2 / text-only
def _qwen_ids(L=30, seed=5):
    return torch.randint(3, 120, (1, L), generator=torch.Generator().manual_seed(seed))


def test_qwen2_fake_span_prunes(qwen2, attach):
    ids = _qwen_ids()
    base = qwen2(input_ids=ids).logits
    h = attach(qwen2, k=2, ratio=0.75, image_token_start_index=5, image_token_length=16)
    out = qwen2(input_ids=ids, use_cache=True)
    assert h.stats.num_visual == [16] and h.stats.keep_count == [4]
    kept = h.stats.kept_visual_positions[0].tolist()
    assert len(kept) == 4 and all(5 <= p < 21 for p in kept)
    assert h.stats.cache_lengths == [30, 30, 18, 18]
    assert out.logits.shape == base.shape
    assert (out.logits[0, -1] - base[0, -1]).abs().max() > 1e-4
    gen = greedy(qwen2, 4, input_ids=ids)
    assert gen.shape == (1, 4)


def test_qwen2_ratio_zero_exact(qwen2):
    ids = _qwen_ids()
    base = qwen2(input_ids=ids).logits
    base_gen = greedy(qwen2, 4, input_ids=ids)
    with apply_quiet(qwen2, k=2, ratio=0.0, image_token_start_index=5, image_token_length=16) as h:
        assert torch.equal(qwen2(input_ids=ids).logits, base)
        assert torch.equal(greedy(qwen2, 4, input_ids=ids), base_gen)
        assert h.stats.keep_count == [16]


def test_qwen2_inplace_equals_mask(qwen2):
    ids = _qwen_ids()
    span = dict(image_token_start_index=5, image_token_length=16)
    with apply_quiet(qwen2, k=1, ratio=0.5, **span):
        a, ga = qwen2(input_ids=ids).logits[0, -1], greedy(qwen2, 4, input_ids=ids)
    with apply_quiet(qwen2, k=1, ratio=0.5, mode="mask", **span):
        b, gb = qwen2(input_ids=ids).logits[0, -1], greedy(qwen2, 4, input_ids=ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(ga, gb)


def test_text_only_llama_without_span_raises(llama_text, attach):
    attach(llama_text, k=2, ratio=0.5)
    with pytest.raises(me.NoVisualTokensError):
        llama_text(input_ids=_qwen_ids())


def test_allow_text_only_passes_through(llava, prompt1, attach):
    """A LLaVA prompt without image tokens runs unchanged with allow_text_only=True; images still prune."""
    ids = _qwen_ids(12)
    base = llava(input_ids=ids).logits
    base_gen = greedy(llava, 3, input_ids=ids)
    h = attach(llava, k=2, ratio=0.5, allow_text_only=True)
    assert torch.equal(llava(input_ids=ids).logits, base)
    assert torch.equal(greedy(llava, 3, input_ids=ids), base_gen)
    llava(**prompt1)
    assert h.stats.keep_count == [8]


def test_span_past_prompt_end_raises(qwen2, attach):
    attach(qwen2, k=2, ratio=0.5, image_token_start_index=20, image_token_length=16)
    with pytest.raises(me.ConfigError, match="image_token_start_index"):
        qwen2(input_ids=_qwen_ids())


def test_llava_span_mismatch_names_fields(llava, prompt1, attach):
    attach(llava, k=2, ratio=0.5, image_token_start_index=4, image_token_length=16)
    with pytest.raises(me.ConfigError) as exc:
        llava(**prompt1)
    assert "image_token_start_index" in str(exc.value) and "image_token_length" in str(exc.value)
    assert "(3, 16)" in str(exc.value)  # the detected span


def test_llava_span_matching_is_accepted(llava, prompt1, attach):
    h = attach(llava, k=2, ratio=0.5, image_token_start_index=3, image_token_length=16)
    llava(**prompt1)
    assert h.stats.keep_count == [8]


# ------------------------------------------------------------------------------------------ edge cases
def test_image_at_position_zero(llava):
    """An image that starts the prompt: mask mode must not produce all-masked (NaN) rows, and both modes
    agree on logits and on generated tokens."""
    ids, pv = llava_prompt(prefix=())
    inputs = dict(input_ids=ids, pixel_values=pv)
    res = {}
    for mode in ("inplace", "mask"):
        with apply_quiet(llava, k=1, ratio=0.75, mode=mode) as h:
            logits = llava(**inputs).logits
            res[mode] = (logits, greedy(llava, 4, **inputs), h.stats.kept_visual_positions[0])
    assert torch.isfinite(res["mask"][0]).all() and torch.isfinite(res["inplace"][0]).all()
    assert torch.equal(res["inplace"][2], res["mask"][2])
    torch.testing.assert_close(res["inplace"][0][0, -1], res["mask"][0][0, -1], atol=1e-5, rtol=0)
    assert torch.equal(res["inplace"][1], res["mask"][1])


@pytest.mark.parametrize("head_reduce", ["mean", "max"])
def test_ties_go_to_lower_positions(head_reduce):
    """With layer 0's query projection zeroed, every score row is uniform, so all visual scores tie
    exactly: the kept set must be the first keep(N, R) visual positions."""
    from mllm_efficiency.testing import tiny_llama_lm

    model = tiny_llama_lm(num_layers=NUM_LAYERS)
    model.model.layers[0].self_attn.q_proj.weight.zero_()
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with apply_quiet(model, k=1, ratio=0.5, image_token_start_index=2, image_token_length=10,
                     head_reduce=head_reduce) as h:
        model(input_ids=ids)
        assert h.stats.kept_visual_positions[0].tolist() == [2, 3, 4, 5, 6]
