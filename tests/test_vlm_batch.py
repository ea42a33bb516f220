"""Batches of VLM prompts with different image counts and lengths, LEFT padded, equal their single runs.

* LLaVA-1.5: 3 prompts with 1 / 2 / 3 images and different text lengths (pad id 0, attention_mask zeros on the
  left; a plain forward gets position_ids = cumsum(mask) - 1, as generate builds them).
* Qwen2-VL and Qwen2.5-VL: 3 prompts with 1 / 2 / 1 images of different grids and text lengths; input_ids,
  attention_mask and mm_token_type_ids are left padded with 0, pixel_values and image_grid_thw concatenated in
  sample order; the wrapper computes the M-RoPE ids of every sample from the attention mask.
* LLaVA-OneVision: an image prompt and a video prompt in one batch.
Per sample, FastV inplace gives the single-run last-token logits (1e-4), the same kept set (shifted by the
sample's padding), and the same greedy tokens (compared up to each sample's EOS).
"""
from __future__ import annotations

import pytest
import torch

from conftest import ENGINE_ATTR, NUM_LAYERS, apply_quiet, cache_of, keep_rule, pad_left
from mllm_efficiency.testing import llava_prompt
from mllm_efficiency.testing.tiny import (
    QWEN_IMAGE, VIDEO_TOKEN, anyres_prompt, qwen_vl_prompt, tiny_llava_next, tiny_llava_onevision,
    tiny_qwen2_5_vl, tiny_qwen2_vl,
)

TOL = 1e-4
N_NEW = 4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ------------------------------------------------------------------------------------------------ helpers
def video_prompt(model, frames=4, prefix=(1, 10, 11), suffix=(12, 13, 14), seed=0):
    """LLaVA-OneVision video prompt built here (as `testing.onevision_video_prompt`), version-robust: the video goes
    to get_video_features positionally, and the newline feature 5.17 appends in forward is counted."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, frames, 3, 32, 32, generator=g)
    feats = model.model.get_video_features(video, vision_feature_layer=-2, vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    n = feats.shape[0]
    if not torch.equal(feats[-1], model.model.image_newline.to(feats.dtype)):
        n += 1  # transformers 5.17 appends the video's newline feature in forward, not in get_video_features
    return dict(input_ids=torch.tensor([list(prefix) + [VIDEO_TOKEN] * n + list(suffix)]), pixel_values_videos=video)


def pad_left_2d(t, L, value=0):
    return torch.cat([torch.full((t.shape[0], L - t.shape[1]), value, dtype=t.dtype), t], 1)


def text_positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def until_eos(tokens, eos):
    out = []
    for t in tokens:
        out.append(t)
        if t in eos:
            break
    return out


def eos_ids(model):
    e = model.generation_config.eos_token_id
    return {e} if isinstance(e, int) else set(e or [])


def generate(model, n=N_NEW, **inputs):
    L = inputs["input_ids"].shape[1]
    return model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, L:].tolist()


def visual_count(model, ids):
    tok = [t for t in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
           if t is not None]
    return int(torch.isin(ids, torch.tensor(tok)).sum())


def check_batch(model, samples, batch, k, ratio, forward_extra=None, **cfg):
    """FastV inplace on the batch vs each sample alone: logits, kept sets, counts, cache lengths, greedy tokens."""
    forward_extra = forward_extra or {}
    L = batch["input_ids"].shape[1]
    eos = eos_ids(model)
    with apply_quiet(model, k=k, ratio=ratio, **cfg) as h:
        single, kept_single, gen_single = [], [], []
        for s in samples:
            single.append(model(**s).logits[0, -1])
            text_only = visual_count(model, s["input_ids"]) == 0
            kept_single.append(torch.zeros(0, dtype=torch.long) if text_only else h.stats.kept_visual_positions[0])
            gen_single.append(generate(model, **s)[0])
        out = model(**batch, **forward_extra, use_cache=True)
        st = h.stats
        gen_batch = generate(model, **batch)
    n_vis = [visual_count(model, s["input_ids"]) for s in samples]
    assert st.num_visual == n_vis
    assert st.keep_count == [keep_rule(n, ratio) for n in n_vis]
    pruned = []
    for b, s in enumerate(samples):
        Lb = s["input_ids"].shape[1]
        pad = L - Lb
        assert st.kept_visual_positions[b].tolist() == (kept_single[b] + pad).tolist()
        torch.testing.assert_close(out.logits[b, -1], single[b], atol=TOL, rtol=0)
        pruned.append(Lb - n_vis[b] + keep_rule(n_vis[b], ratio))
        assert until_eos(gen_batch[b], eos) == until_eos(gen_single[b], eos), f"sample {b}"
    assert st.pruned_length == pruned
    cache = cache_of(out)
    # layers >= K hold the longest row of kept slots (left padding counts; shorter rows get invalid filler slots)
    rows = [L - n + keep_rule(n, ratio) for n in n_vis]
    assert [cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)] == [L] * k + [max(rows)] * (NUM_LAYERS - k)


# ------------------------------------------------------------------------------------------------ LLaVA-1.5
@pytest.fixture(scope="module")
def llava_samples():
    specs = [dict(num_images=1, prefix=(1, 10, 11, 15, 16, 17, 18), suffix=(12, 13)),
             dict(num_images=2, prefix=(1, 10), suffix=(12, 13, 14, 30, 31)),
             dict(num_images=3, prefix=(1, 10, 11), between=(20,), suffix=(12,))]
    out = []
    for i, spec in enumerate(specs):
        ids, pv = llava_prompt(seed=20 + i, **spec)
        out.append(dict(input_ids=ids, pixel_values=pv))
    return out


@pytest.fixture(scope="module")
def llava_batch(llava_samples):
    ids, am = pad_left([s["input_ids"] for s in llava_samples])
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.cat([s["pixel_values"] for s in llava_samples]))


def test_llava_fixture_shapes(llava, llava_samples, llava_batch):
    lengths = [s["input_ids"].shape[1] for s in llava_samples]
    assert len(set(lengths)) == 3
    assert [visual_count(llava, s["input_ids"]) for s in llava_samples] == [16, 32, 48]
    # unmodified batch == single runs (so the FastV comparison is meaningful)
    out = llava(**llava_batch, position_ids=text_positions(llava_batch["attention_mask"])).logits
    for b, s in enumerate(llava_samples):
        torch.testing.assert_close(out[b, -1], llava(**s).logits[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75), (3, 0.9)])
def test_llava_batch_equals_single_runs(llava, llava_samples, llava_batch, k, ratio):
    check_batch(llava, llava_samples, llava_batch, k, ratio,
                forward_extra=dict(position_ids=text_positions(llava_batch["attention_mask"])))


# ------------------------------------------------------------------------------------------------ Qwen2-VL
QWEN_BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


@pytest.fixture(scope="module")
def qwen_models():
    built = {}

    def get(family):
        if family not in built:
            built[family] = QWEN_BUILDERS[family](num_layers=NUM_LAYERS)
        return built[family]

    return get


@pytest.fixture(scope="module")
def qwen_samples():
    return [qwen_vl_prompt(grids=((1, 4, 8),), prefix=(5, 6, 10, 11, 12), suffix=(7, 8), seed=30),
            qwen_vl_prompt(grids=((1, 4, 4), (1, 8, 8)), prefix=(5,), between=(20,), suffix=(7, 8, 9, 13), seed=31),
            qwen_vl_prompt(grids=((1, 8, 4),), prefix=(5, 6), suffix=(7,), seed=32)]


def qwen_batch_of(samples):
    L = max(s["input_ids"].shape[1] for s in samples)
    ids = torch.cat([pad_left_2d(s["input_ids"], L) for s in samples])
    mask = torch.cat([pad_left_2d(torch.ones_like(s["input_ids"]), L) for s in samples])
    mm = torch.cat([pad_left_2d(s["mm_token_type_ids"], L) for s in samples])
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm,
                pixel_values=torch.cat([s["pixel_values"] for s in samples if "pixel_values" in s]),
                image_grid_thw=torch.cat([s["image_grid_thw"] for s in samples if "image_grid_thw" in s]))


@pytest.fixture(params=list(QWEN_BUILDERS))
def qwen(request, qwen_models):
    model = qwen_models(request.param)
    yield model
    text = model.model.language_model
    assert not hasattr(text, ENGINE_ATTR) and text.config._attn_implementation == "sdpa"


def test_qwen_fixture_and_unmodified_batch(qwen, qwen_samples):
    lengths = [s["input_ids"].shape[1] for s in qwen_samples]
    assert len(set(lengths)) == 3
    assert [int((s["input_ids"] == QWEN_IMAGE).sum()) for s in qwen_samples] == [8, 4 + 16, 8]
    batch = qwen_batch_of(qwen_samples)
    out = qwen(**batch).logits
    for b, s in enumerate(qwen_samples):
        torch.testing.assert_close(out[b, -1], qwen(**s).logits[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75), (3, 0.9)])
def test_qwen_batch_equals_single_runs(qwen, qwen_samples, k, ratio):
    check_batch(qwen, qwen_samples, qwen_batch_of(qwen_samples), k, ratio)


def test_qwen_batch_with_a_text_only_sample(qwen, qwen_samples):
    """A text-only sample (no image, mm_token_type_ids all 0) rides along unchanged next to pruned samples."""
    ids = torch.tensor([[5, 6, 40, 41, 42, 43, 44, 7]])
    text = dict(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int))
    samples = [qwen_samples[0], text, qwen_samples[1]]
    check_batch(qwen, samples, qwen_batch_of(samples), 2, 0.75, allow_text_only=True)


def test_stats_describe_a_text_only_prefill(qwen, qwen_samples):
    """After a prefill without visual tokens (allow_text_only=True) the stats describe THAT prefill, not the
    previous prompt (regression: they used to keep the previous prompt's counts and kept positions)."""
    ids = torch.tensor([[5, 6, 40, 41, 42, 43]])
    text = dict(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int))
    with apply_quiet(qwen, k=2, ratio=0.75, allow_text_only=True) as h:
        qwen(**qwen_samples[0])
        assert h.stats.num_visual == [8]
        qwen(**text)
        st = h.stats
        assert st.num_visual == [0] and st.keep_count == [0]
        assert st.sequence_length == 6 and st.pruned_length == [6]
        assert [p.tolist() for p in st.kept_visual_positions] == [[]]


# ------------------------------------------------------------------------------------------------ LLaVA-NeXT
def test_llava_next_anyres_batch_equals_single_runs():
    """Anyres prompts with 1 and 2 images (88 features each, newline features included) in one padded batch."""
    model = tiny_llava_next(num_layers=NUM_LAYERS)
    a = anyres_prompt(model, 1, seed=50, prefix=(1, 10, 11, 12, 13, 14))
    b = anyres_prompt(model, 2, seed=51, suffix=(12, 13))
    ids, am = pad_left([a["input_ids"], b["input_ids"]])
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                 image_sizes=torch.cat([a["image_sizes"], b["image_sizes"]]))
    for k, ratio in [(1, 0.5), (3, 0.9)]:
        check_batch(model, [a, b], batch, k, ratio, forward_extra=dict(position_ids=text_positions(am)))
    assert not hasattr(model.model.language_model, ENGINE_ATTR)


# ------------------------------------------------------------------------------------------------ OneVision
@pytest.fixture(scope="module")
def onevision():
    return tiny_llava_onevision(num_layers=NUM_LAYERS)


def test_onevision_image_and_video_in_one_batch(onevision):
    model = onevision
    img = anyres_prompt(model, 1, seed=40, prefix=(1, 10, 11, 15), suffix=(12, 13))
    vid = video_prompt(model, frames=4, seed=41, suffix=(12, 13, 14, 16, 17))
    ids, am = pad_left([img["input_ids"], vid["input_ids"]])
    batch = dict(input_ids=ids, attention_mask=am, pixel_values=img["pixel_values"], image_sizes=img["image_sizes"],
                 pixel_values_videos=vid["pixel_values_videos"])
    pos = text_positions(am)
    try:
        base = model(**batch, position_ids=pos).logits
    except Exception as exc:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"transformers cannot batch an image and a video prompt for LLaVA-OneVision: {exc!r}")
    for b, s in enumerate([img, vid]):
        torch.testing.assert_close(base[b, -1], model(**s).logits[0, -1], atol=1e-5, rtol=0)
    try:
        for k, ratio in [(1, 0.5), (2, 0.75)]:
            check_batch(model, [img, vid], batch, k, ratio, forward_extra=dict(position_ids=pos))
    finally:
        text = model.model.language_model
        assert not hasattr(text, ENGINE_ATTR)


def test_qwen_batch_mask_mode_generate(qwen, qwen_samples):
    """Mask mode (dropped tokens hidden as keys) on the padded M-RoPE batch gives the inplace and single-run tokens."""
    batch = qwen_batch_of(qwen_samples)
    eos = eos_ids(qwen)
    with apply_quiet(qwen, k=2, ratio=0.75, mode="inplace"):
        inplace = generate(qwen, **batch)
    with apply_quiet(qwen, k=2, ratio=0.75, mode="mask"):
        single = [generate(qwen, **s)[0] for s in qwen_samples]
        masked = generate(qwen, **batch)
    for b in range(len(qwen_samples)):
        assert until_eos(masked[b], eos) == until_eos(single[b], eos) == until_eos(inplace[b], eos), f"sample {b}"
