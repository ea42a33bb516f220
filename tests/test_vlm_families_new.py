"""The families of issue 18: InternVL 2.5 / 3, Qwen3-VL (interleaved M-RoPE + DeepStack), Gemma 3 (sliding-window
layers, bidirectional image mask). Tiny random-weight builds, 4 text layers, sdpa.

InternVL and Qwen3-VL get the rows of the existing families (test_vlm_families / test_qwen2vl_mrope /
test_vlm_batch / test_kv_vlm): prompt geometry, ratio 0 bit-identical and remove() restoring the model, the keep
count over all visual tokens with the pruned length and per-layer cache lengths, the kept set equal to an eager
copy's attention row, inplace == mask (logits, greedy cached decode), SnapKV ratio 0 exact and its per-layer budget
with cached decode, FastV + SnapKV, a left-padded batch equal to its single runs.
Qwen3-VL: DeepStack adds visual features to the outputs of layers 0 and 1 at the full prompt's visual positions,
so inplace pruning from k <= 1 is refused at apply (naming k and the DeepStack layers); k >= 2 inplace equals mask
mode (which keeps every position, so DeepStack sees the full sequence); decode positions continue from rope_deltas.
Gemma 3: every method family that touches the decoder is refused at apply with an error naming the model and the
reason; the model is untouched afterwards.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ENGINE_ATTR, apply_quiet, cache_of, family_models, keep_rule, pad_left
from test_vlm_batch import check_batch, qwen_batch_of, text_positions

import mllm_efficiency as me
from mllm_efficiency.adapters import get_adapter, supported_models
from mllm_efficiency.testing.tiny import (
    GEMMA3_IMAGE,
    QWEN3_DEEPSTACK,
    gemma3_prompt,
    internvl_prompt,
    qwen3_vl_prompt,
    tiny_gemma3,
    tiny_internvl,
    tiny_qwen3_vl,
)

NUM_LAYERS = 4
TIE = 1e-6

BUILDERS = {"internvl3": lambda **kw: tiny_internvl(version="3", **kw),
            "internvl2_5": lambda **kw: tiny_internvl(version="2.5", **kw),
            "qwen3_vl": tiny_qwen3_vl}
# case -> (family, prompt, visual tokens from the geometry: InternVL 16 per 32x32 image (8x8 patches, pixel
# shuffle 0.5); Qwen3-VL t*h*w/4 per grid after the 2x2 merge)
CASES = {
    "internvl3": ("internvl3", lambda: internvl_prompt(2, seed=1), 2 * 16),
    "internvl2_5": ("internvl2_5", lambda: internvl_prompt(2, seed=2), 2 * 16),
    "qwen3_vl": ("qwen3_vl", lambda: qwen3_vl_prompt(grids=((1, 4, 4), (1, 4, 8)), seed=3), 4 + 8),
}
MIN_K = {"internvl3": 1, "internvl2_5": 1, "qwen3_vl": len(QWEN3_DEEPSTACK)}  # inplace pruning from this layer on


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture(scope="module")
def models():
    return family_models(BUILDERS, NUM_LAYERS)


@pytest.fixture(params=list(CASES))
def env(request, models):
    family, build, n = CASES[request.param]
    model = models(family)
    yield family, model, build(), n
    text = model.model.language_model
    assert not hasattr(text, ENGINE_ATTR), "a pruning engine was left attached"
    assert text.config._attn_implementation == "sdpa"


def visual_mask(model, ids):
    tok = [t for t in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
           if t is not None]
    return torch.isin(ids, torch.tensor(tok))


def greedy(model, prompt, n=5):
    L = prompt["input_ids"].shape[1]
    return model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, L:].tolist()


# ------------------------------------------------------------------------------------------------ adapters
def test_adapter_families_and_layers(models):
    fam = {f: get_adapter(models(f)) for f in BUILDERS}
    assert fam["internvl3"].family == fam["internvl2_5"].family == "internvl"
    assert type(fam["internvl3"].text_model).__name__ == "Qwen2Model"
    assert type(fam["internvl2_5"].text_model).__name__ == "LlamaModel"
    q3 = fam["qwen3_vl"]
    assert q3.family == "qwen3_vl" and q3.uses_mrope and q3.deepstack_layers() == [0, 1]
    assert q3.text_model.config.rope_parameters.get("mrope_interleaved") is True
    for a in fam.values():
        assert a.sliding_window_layers() == [] and a.global_layers() == list(range(NUM_LAYERS))
    for cls in ("InternVLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                "Gemma3ForConditionalGeneration"):
        assert cls in supported_models()


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_geometry(models, case):
    family, build, n = CASES[case]
    model = models(family)
    prompt = build()
    assert int(visual_mask(model, prompt["input_ids"]).sum()) == n
    assert int(get_adapter(model).visual_mask(prompt["input_ids"]).sum()) == n
    model(**prompt)  # the placeholder count matches the features the model produces


# ------------------------------------------------------------------------------------------------ FastV rows
def test_ratio_zero_bit_identical_and_remove_restores(env):
    family, model, prompt, n = env
    k = MIN_K[family] + 1
    base = model(**prompt).logits
    with apply_quiet(model, k=k, ratio=0.0) as h:
        assert torch.equal(model(**prompt).logits, base)
        assert h.stats.keep_count == h.stats.num_visual == [n]
    with apply_quiet(model, k=k, ratio=0.75) as h:
        pruned = model(**prompt).logits
        assert h.stats.keep_count[0] < n
    assert not torch.allclose(pruned[0, -1], base[0, -1], atol=1e-6)
    assert torch.equal(model(**prompt).logits, base)
    text = model.model.language_model
    assert not any(a.startswith("_mllm_eff") for a in vars(text))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("dk", [0, 1])
def test_keep_count_and_cache_lengths(env, ratio, dk):
    family, model, prompt, n = env
    k = MIN_K[family] + dk
    L = prompt["input_ids"].shape[1]
    visual = visual_mask(model, prompt["input_ids"])[0]
    with apply_quiet(model, k=k, ratio=ratio) as h:
        out = model(**prompt, use_cache=True)
        st = h.stats
    keep = keep_rule(n, ratio)
    assert st.num_visual == [n] and st.keep_count == [keep]
    kept = st.kept_visual_positions[0]
    assert len(kept) == keep and bool(visual[kept].all())
    pruned = L - n + keep
    assert st.pruned_length == [pruned]
    assert out.logits.shape[:2] == (1, L)
    lengths = [cache_of(out).layers[i].keys.shape[-2] for i in range(NUM_LAYERS)]
    assert lengths == [L] * k + [pruned] * (NUM_LAYERS - k) == st.cache_lengths


@pytest.mark.parametrize("dk", [0, 1])
def test_inplace_equals_mask_with_cached_decode(env, dk):
    """Inplace (cache of the kept tokens) and mask mode (full cache, dropped keys hidden) agree on the logits and
    on 5 greedy tokens decoded from the cache; on Qwen3-VL mask mode keeps every position, so its DeepStack
    additions are the model's own, and inplace must match them."""
    family, model, prompt, _ = env
    k = MIN_K[family] + dk
    res = {}
    for mode in ("inplace", "mask"):
        with apply_quiet(model, k=k, ratio=0.75, mode=mode) as h:
            logits = model(**prompt).logits[0, -1]
            res[mode] = (logits, h.stats.kept_visual_positions[0].tolist(), greedy(model, prompt))
    assert res["inplace"][1] == res["mask"][1]
    torch.testing.assert_close(res["inplace"][0], res["mask"][0], atol=1e-5, rtol=0)
    assert res["inplace"][2] == res["mask"][2]


@pytest.mark.parametrize("k,ratio", [(2, 0.5), (3, 0.75)])
def test_kept_set_equals_eager_reference(env, models, k, ratio):
    family, model, prompt, n = env
    eager = models(family, "eager")
    att = eager(**prompt, output_attentions=True).attentions[k - 1]
    scores = att[0, :, -1, :].double().mean(0)
    cand = visual_mask(model, prompt["input_ids"])[0].nonzero().flatten().tolist()
    keep = keep_rule(n, ratio)
    with apply_quiet(model, k=k, ratio=ratio) as h:
        logits = model(**prompt).logits[0, -1]
        got = h.stats.kept_visual_positions[0].tolist()
    ranked = sorted(cand, key=lambda j: (-float(scores[j]), j))
    ref = sorted(ranked[:keep])
    if got != ref:
        cut = float(scores[ranked[keep - 1]])
        assert all(abs(float(scores[j]) - cut) < TIE for j in set(got) ^ set(ref))
    with apply_quiet(eager, k=k, ratio=ratio) as h:
        torch.testing.assert_close(eager(**prompt).logits[0, -1], logits, atol=1e-5, rtol=0)
        assert h.stats.kept_visual_positions[0].tolist() == got


# ------------------------------------------------------------------------------------------------ KV methods
def test_snapkv_ratio_zero_budget_and_decode(env):
    _, model, prompt, _ = env
    L = prompt["input_ids"].shape[1]
    base = model(**prompt).logits
    ref_tokens = greedy(model, prompt, 3)
    with me.apply(model, "snapkv", ratio=0.0):
        assert torch.equal(model(**prompt).logits, base)
        assert greedy(model, prompt, 3) == ref_tokens  # nothing evicted: cached decode is the model's own
    with me.apply(model, "snapkv", ratio=0.5):
        out = model(**prompt, use_cache=True)
        assert torch.equal(out.logits, base)  # compression acts after each layer's attention
        assert [layer.keys.shape[-2] for layer in cache_of(out).layers] == [L // 2] * NUM_LAYERS
        assert len(greedy(model, prompt, 3)) == 3
    assert torch.equal(model(**prompt).logits, base)


def test_fastv_then_snapkv(env):
    family, model, prompt, _ = env
    k = MIN_K[family] + 1
    L = prompt["input_ids"].shape[1]
    with apply_quiet(model, k=k, ratio=0.5) as fv, me.apply(model, "snapkv", ratio=0.5):
        out = model(**prompt, use_cache=True)
        stored = [layer.keys.shape[-2] for layer in cache_of(out).layers]
        pruned = fv.stats.pruned_length[0]
        assert stored == [L // 2] * k + [pruned // 2] * (NUM_LAYERS - k)
        assert len(greedy(model, prompt, 3)) == 3


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("family", ["internvl3", "internvl2_5"])
@pytest.mark.parametrize("k,ratio", [(1, 0.5), (3, 0.9)])
def test_internvl_left_padded_batch_equals_single_runs(models, family, k, ratio):
    model = models(family)
    samples = [internvl_prompt(1, prefix=(1, 10, 11, 15, 16, 17), suffix=(12, 13), seed=20),
               internvl_prompt(2, prefix=(1, 10), suffix=(12, 13, 14, 30), seed=21),
               internvl_prompt(1, prefix=(1,), suffix=(12,), seed=22)]
    ids, am = pad_left([s["input_ids"] for s in samples])
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=torch.cat([s["pixel_values"] for s in samples]))
    check_batch(model, samples, batch, k, ratio, forward_extra=dict(position_ids=text_positions(am)))
    assert not hasattr(model.model.language_model, ENGINE_ATTR)


@pytest.mark.parametrize("k,ratio", [(2, 0.5), (3, 0.9)])
def test_qwen3_vl_left_padded_batch_equals_single_runs(models, k, ratio):
    model = models("qwen3_vl")
    samples = [qwen3_vl_prompt(grids=((1, 4, 8),), prefix=(5, 6, 10, 11, 12), suffix=(7, 8), seed=30),
               qwen3_vl_prompt(grids=((1, 4, 4), (1, 8, 8)), prefix=(5,), between=(20,), suffix=(7, 8, 9, 13),
                               seed=31),
               qwen3_vl_prompt(grids=((1, 8, 4),), prefix=(5, 6), suffix=(7,), seed=32)]
    batch = qwen_batch_of(samples)
    out = model(**batch).logits
    for b, s in enumerate(samples):  # the unmodified model batches exactly (DeepStack and M-RoPE per sample)
        torch.testing.assert_close(out[b, -1], model(**s).logits[0, -1], atol=1e-5, rtol=0)
    check_batch(model, samples, batch, k, ratio)
    assert not hasattr(model.model.language_model, ENGINE_ATTR)


# ------------------------------------------------------------------------------------------------ Qwen3-VL
@pytest.mark.parametrize("k", [0, 1])
def test_qwen3_vl_refuses_inplace_pruning_before_deepstack_layers(models, k):
    scorer = dict(scorer="random") if k == 0 else {}
    model = models("qwen3_vl")
    prompt = CASES["qwen3_vl"][1]()
    base = model(**prompt).logits
    with pytest.raises(me.UnsupportedMethodError, match=rf"k={k}.*DeepStack.*\[0, 1\]") as info:
        apply_quiet(model, k=k, ratio=0.5, **scorer)
    assert isinstance(info.value, NotImplementedError) and "Qwen3VLForConditionalGeneration" in str(info.value)
    with pytest.raises(me.UnsupportedMethodError, match="DeepStack"):
        me.apply(model, "simignore", action="drop")  # removes image tokens before layer 0
    text = model.model.language_model
    assert not hasattr(text, ENGINE_ATTR) and text.config._attn_implementation == "sdpa"
    assert torch.equal(model(**prompt).logits, base)
    # mask mode keeps the sequence length, so DeepStack's additions land where the model puts them
    with apply_quiet(model, k=k, ratio=0.0, mode="mask", **scorer):
        torch.testing.assert_close(model(**prompt).logits, base, atol=1e-6, rtol=0)
    with apply_quiet(model, k=k, ratio=0.5, mode="mask", **scorer) as h:
        model(**prompt)
        assert h.stats.keep_count == [keep_rule(12, 0.5)]


def test_qwen3_vl_pruned_tokens_keep_deepstack_features(models):
    """k = 2 inplace drops visual tokens only after both DeepStack additions: the logits equal a run of the
    model's own layers where the dropped tokens are removed from the hidden states after layer 1 (DeepStack
    applied by the model itself), and differ from a run without DeepStack (so the additions do matter)."""
    model = models("qwen3_vl")
    prompt = CASES["qwen3_vl"][1]()
    lm = model.model.language_model
    got = {}

    def grab(module, args, kwargs):
        got.update(kwargs)

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**prompt)
    finally:
        handle.remove()
    assert got["deepstack_visual_embeds"] is not None and len(got["deepstack_visual_embeds"]) == 2
    with apply_quiet(model, k=2, ratio=0.5) as h:
        out = model(**prompt).logits[0, -1]
        kept_vis = h.stats.kept_visual_positions[0].tolist()
    pos = got["position_ids"]  # (3, 1, L) M-RoPE rows, or (4, 1, L) with the text row first
    text_pos, pos = (pos[0], pos[1:]) if pos.shape[0] == 4 else (None, pos)
    visual = got["visual_pos_masks"][0]
    L = visual.shape[0]
    kept = torch.tensor(sorted(set(range(L)) - set(visual.nonzero().flatten().tolist()) | set(kept_vis)))

    def run(deepstack):
        h = got["inputs_embeds"]
        pe = lm.rotary_emb(h, pos)
        for i in range(2):
            h = lm.layers[i](h, attention_mask=None, position_ids=text_pos, position_embeddings=pe, use_cache=False)
            if deepstack:
                h = h.clone()
                h[0, visual] = h[0, visual] + got["deepstack_visual_embeds"][i]
        h = h[:, kept]
        pe = lm.rotary_emb(h, pos[..., kept])
        for i in range(2, NUM_LAYERS):
            h = lm.layers[i](h, attention_mask=None, position_embeddings=pe, use_cache=False,
                             position_ids=None if text_pos is None else text_pos[..., kept])
        return model.lm_head(lm.norm(h))[0, -1]

    torch.testing.assert_close(out, run(True), atol=1e-4, rtol=0)
    assert (out - run(False)).abs().max() > 1e-3


def test_qwen3_vl_decode_positions_continue_from_rope_deltas(models):
    model = models("qwen3_vl")
    prompt = CASES["qwen3_vl"][1]()
    L = prompt["input_ids"].shape[1]

    def positions(**cfg):
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
        try:
            if cfg:
                with apply_quiet(model, **cfg):
                    toks = greedy(model, prompt, 4)
            else:
                toks = greedy(model, prompt, 4)
        finally:
            hook.remove()
        return toks, seen

    _, base = positions()
    delta = int(model.model.rope_deltas.flatten()[0])
    assert delta < 0  # the 2-D image grids make the M-RoPE rows shorter than the sequence
    toks, seen = positions(k=2, ratio=0.75)
    toks_mask, _ = positions(k=2, ratio=0.75, mode="mask")
    assert toks == toks_mask
    assert all(torch.equal(a, b) for a, b in zip(seen, base))
    for t in range(1, 4):
        assert seen[t][1:].flatten().tolist() == [L + t - 1 + delta] * 3


# ------------------------------------------------------------------------------------------------ Gemma 3
@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3(num_layers=NUM_LAYERS)


def test_gemma3_adapter_layers_and_image_tokens(gemma):
    a = get_adapter(gemma)
    assert a.family == "gemma3"
    assert a.sliding_window_layers() == [0, 2] and a.global_layers() == [1, 3]
    prompt = gemma3_prompt(2, seed=4)
    assert int(a.visual_mask(prompt["input_ids"]).sum()) == 32 == int((prompt["input_ids"] == GEMMA3_IMAGE).sum())
    gemma(**prompt)


@pytest.mark.parametrize("method,cfg", [("fastv", dict(k=2, ratio=0.5)), ("fastv", dict(k=1, ratio=0.0, mode="mask")),
                                        ("simignore", {}), ("snapkv", dict(ratio=0.5)), ("h2o", dict(ratio=0.5)),
                                        ("streamingllm", dict(ratio=0.5)), ("framefusion", {}),
                                        ("streamingllm_memory", {})])
def test_gemma3_refuses_at_apply(gemma, method, cfg):
    prompt = gemma3_prompt(1, seed=5)
    base = gemma(**prompt).logits
    with pytest.raises(me.UnsupportedMethodError) as info:
        me.apply(gemma, method, **cfg)
    msg = str(info.value)
    assert "Gemma3ForConditionalGeneration" in msg and method in msg
    assert "sliding-window layers [0, 2]" in msg and "global layers [1, 3]" in msg
    assert isinstance(info.value, NotImplementedError)
    text = gemma.model.language_model
    assert not hasattr(text, ENGINE_ATTR) and text.config._attn_implementation == "sdpa"
    assert not any(a.startswith("_mllm_eff") for a in vars(text))
    assert torch.equal(gemma(**prompt).logits, base)
