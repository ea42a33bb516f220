"""FastV on the multimodal families beyond LLaVA-1.5: LLaVA-NeXT and LLaVA-OneVision (anyres tiles with
newline features, OneVision video frames, an image and a video in one prompt), Qwen2-VL and Qwen2.5-VL
(M-RoPE: two images of different grids; an image and a 2-temporal-patch video in one prompt).

For every family (tiny random-weight builds, 4 text layers, sdpa):
* ratio 0 is a no-op bit for bit, and `remove()` restores the model (logits, hooks, attention implementation);
* inplace and mask mode agree (last-token logits 1e-5, 5 greedy tokens) for K = 1, 2, 3;
* the keep count is the keep rule over ALL visual tokens of the prompt (every image, every anyres tile and
  newline feature, every video frame); the pruned length and the per-layer cache lengths follow from it;
* the kept set equals the one read off an eager-attention copy of the model (same weights, unpruned,
  output_attentions=True): layer K-1, last query row, mean over heads, visual columns, top keep,
  ties to the lower position;
* save_pretrained -> from_pretrained keeps FastV working (and ratio 0 exact);
* grouping="per_span" keeps keep(n_i) per image span of a 2-image prompt.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ENGINE_ATTR, apply_quiet, cache_of, keep_rule
from mllm_efficiency.testing.tiny import (
    QWEN_IMAGE, QWEN_VEND, QWEN_VIDEO, QWEN_VSTART, VIDEO_TOKEN, anyres_prompt, onevision_video_prompt,
    qwen_vl_prompt, tiny_llava_next, tiny_llava_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl,
)

NUM_LAYERS = 4
TIE = 1e-6  # reference scores closer than this to the cut-off may be ranked either way (sdpa vs eager rounding)

BUILDERS = {"llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision, "qwen2_vl": tiny_qwen2_vl,
            "qwen2_5_vl": tiny_qwen2_5_vl}


def video_prompt(model, frames=4, prefix=(1, 10, 11), suffix=(12, 13, 14), seed=0):
    """A LLaVA-OneVision video prompt built here, independently of `testing.onevision_video_prompt`: the video is
    passed to `get_video_features` positionally (`pixel_values_videos` in transformers 5.24, `pixel_values` in 5.17),
    and the newline feature is counted whether get_video_features (5.24) or the forward (5.17) appends it."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, frames, 3, 32, 32, generator=g)
    feats = model.model.get_video_features(video, vision_feature_layer=-2, vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
    n = feats.shape[0]
    if not torch.equal(feats[-1], model.model.image_newline.to(feats.dtype)):
        n += 1  # transformers 5.17 appends the video's newline feature in forward, not in get_video_features
    ids = list(prefix) + [VIDEO_TOKEN] * n + list(suffix)
    return dict(input_ids=torch.tensor([ids]), pixel_values_videos=video)


def _onevision_image_video(model, seed=0):
    """One anyres image, two text tokens, then a 4-frame video (image and video token ids in one prompt)."""
    img = anyres_prompt(model, 1, seed=seed, suffix=(20, 21))
    vid = video_prompt(model, frames=4, seed=seed + 1, prefix=())
    return dict(input_ids=torch.cat([img["input_ids"], vid["input_ids"]], 1), pixel_values=img["pixel_values"],
                image_sizes=img["image_sizes"], pixel_values_videos=vid["pixel_values_videos"])


def qwen_image_video_prompt(image_grid=(1, 4, 4), video_grid=(2, 4, 8), seed=0):
    """Qwen2-VL prompt with one image (token 150) and one video (token 151, 2 temporal patches = 4 frames)."""
    g = torch.Generator().manual_seed(seed)
    n_img = image_grid[0] * image_grid[1] * image_grid[2] // 4
    n_vid = video_grid[0] * video_grid[1] * video_grid[2] // 4
    ids = torch.tensor([[5, 6, QWEN_VSTART] + [QWEN_IMAGE] * n_img + [QWEN_VEND, 20, 21, QWEN_VSTART]
                        + [QWEN_VIDEO] * n_vid + [QWEN_VEND, 7, 8, 9]])
    mm = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
    return dict(input_ids=ids, mm_token_type_ids=mm,
                pixel_values=torch.randn(4 * n_img, 96, generator=g), image_grid_thw=torch.tensor([image_grid]),
                pixel_values_videos=torch.randn(4 * n_vid, 96, generator=g), video_grid_thw=torch.tensor([video_grid]))


# case -> (family, prompt builder, expected number of visual tokens computed from the geometry, not from input_ids)
# anyres 64x64 image on pinpoints [[32,64],[64,32],[64,64]]: base view 4x4 = 16 features + 2x2 tiles of 4x4 patches
# unpadded to 8x8 with one newline feature per row = 8 * 9 = 72 -> 88 per image.
# OneVision video: every 32x32 frame gives 4x4 patches, pooled 2x2 -> 4 features per frame, plus one newline.
# Qwen2-VL: grid (t, h, w) in patches gives t*h*w / 4 tokens after the 2x2 merge (videos: t temporal patches).
CASES = {
    "llava_next": ("llava_next", lambda m: anyres_prompt(m, 2, seed=3), 2 * 88),
    "onevision_image": ("llava_onevision", lambda m: anyres_prompt(m, 2, seed=4), 2 * 88),
    "onevision_video": ("llava_onevision", lambda m: video_prompt(m, frames=4, seed=5), 4 * 4 + 1),
    "onevision_image_video": ("llava_onevision", lambda m: _onevision_image_video(m, seed=6), 88 + 4 * 4 + 1),
    "qwen2_vl": ("qwen2_vl", lambda m: qwen_vl_prompt(grids=((1, 4, 4), (1, 4, 8)), seed=7), 4 + 8),
    "qwen2_5_vl": ("qwen2_5_vl", lambda m: qwen_vl_prompt(grids=((1, 4, 4), (1, 4, 8)), seed=8), 4 + 8),
    "qwen2_vl_image_video": ("qwen2_vl", lambda m: qwen_image_video_prompt(seed=9), 4 + 16),
    "qwen2_5_vl_image_video": ("qwen2_5_vl", lambda m: qwen_image_video_prompt(seed=10), 4 + 16),
}
TWO_IMAGE_CASES = ["llava_next", "onevision_image", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


class Models:
    """Lazily built models, shared by the module: the sdpa build and an eager copy with the same weights."""

    def __init__(self):
        self._m = {}

    def get(self, family: str, impl: str = "sdpa"):
        key = (family, impl)
        if key not in self._m:
            model = BUILDERS[family](num_layers=NUM_LAYERS, attn_implementation=impl)
            if impl != "sdpa":
                model.load_state_dict(self.get(family).state_dict())
            self._m[key] = model
        return self._m[key]


@pytest.fixture(scope="module")
def models():
    return Models()


@pytest.fixture(scope="module")
def prompts(models):
    cache = {}

    def get(case):
        if case not in cache:
            family, build, _ = CASES[case]
            cache[case] = build(models.get(family))
        return cache[case]

    return get


@pytest.fixture
def case_env(request, models, prompts):
    """(model, prompt, expected N) for the parametrized `case`; checks at teardown that nothing stays attached."""
    case = request.param
    family = CASES[case][0]
    model = models.get(family)
    yield model, prompts(case), CASES[case][2]
    text = model.model.language_model
    assert not hasattr(text, ENGINE_ATTR), "a pruning engine was left attached"
    assert text.config._attn_implementation == "sdpa"


def cases(names=tuple(CASES)):
    return pytest.mark.parametrize("case_env", list(names), indirect=True)


# ------------------------------------------------------------------------------------------------ helpers
def visual_mask(model, input_ids):
    """(B, L) bool: positions holding the config's image or video token id (read here from the config)."""
    ids = [t for t in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
           if t is not None]
    return torch.isin(input_ids, torch.tensor(ids))


def spans(row):
    """Contiguous runs of True as (start, length)."""
    out, start = [], None
    for j, v in enumerate(row.tolist() + [False]):
        if v and start is None:
            start = j
        elif not v and start is not None:
            out.append((start, j - start))
            start = None
    return out


def last_logits(model, prompt):
    return model(**prompt).logits[0, -1]


def generate(model, prompt, n=5):
    L = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, L:].tolist()


def eager_scores(models, family, prompt, k):
    """Layer k-1 attention of the LAST query row, mean over heads, from the eager copy (unpruned)."""
    eager = models.get(family, "eager")
    att = eager(**prompt, output_attentions=True).attentions[k - 1]  # (1, H, L, L)
    assert att.shape[-1] == prompt["input_ids"].shape[1]
    return att[0, :, -1, :].double().mean(0)


def assert_topk(scores, candidates, keep, got):
    """`got` (sorted positions) must be the top `keep` of `candidates` by `scores`, ties to the lower position;
    only positions whose score is within TIE of the cut-off may be swapped."""
    ranked = sorted(candidates, key=lambda j: (-float(scores[j]), j))
    ref = sorted(ranked[:keep])
    got = list(got)
    assert len(got) == keep and set(got) <= set(candidates)
    if got != ref:
        cut = float(scores[ranked[keep - 1]])
        diff = set(got) ^ set(ref)
        assert all(abs(float(scores[j]) - cut) < TIE for j in diff), (
            f"kept set differs from the eager reference beyond ties: lib-only {sorted(set(got) - set(ref))}, "
            f"ref-only {sorted(set(ref) - set(got))}")


def hook_counts(model):
    text = model.model.language_model
    mods = [model, model.model, text, text.norm] + list(text.layers) + [l.self_attn for l in text.layers]
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in mods]


# ------------------------------------------------------------------------------------------------ tests
@cases()
def test_prompt_geometry(case_env):
    """The fixture prompts hold the visual-token counts the model geometry predicts."""
    model, prompt, n_expected = case_env
    assert int(visual_mask(model, prompt["input_ids"]).sum()) == n_expected


@cases()
def test_ratio_zero_bit_identical_and_remove_restores(case_env):
    model, prompt, _ = case_env
    before_hooks = hook_counts(model)
    base = model(**prompt).logits
    with apply_quiet(model, k=2, ratio=0.0) as h:
        out = model(**prompt).logits
        assert h.stats.keep_count == h.stats.num_visual
    assert torch.equal(out, base)
    # an active prune, then remove(): the model is exactly as before
    h = apply_quiet(model, k=2, ratio=0.75)
    try:
        pruned = model(**prompt).logits
        assert h.stats.keep_count[0] < h.stats.num_visual[0]
        assert not torch.allclose(pruned[0, -1], base[0, -1], atol=1e-6)  # the prune did change something
    finally:
        h.remove()
    assert torch.equal(model(**prompt).logits, base)
    assert hook_counts(model) == before_hooks
    text = model.model.language_model
    assert text.config._attn_implementation == "sdpa"
    assert not any(a.startswith("_mllm_eff") for a in vars(text))
    assert not any(a.startswith("_mllm_eff") for l in text.layers for a in vars(l.self_attn))


@cases()
@pytest.mark.parametrize("k", [1, 2, 3])
def test_inplace_equals_mask(case_env, k):
    model, prompt, _ = case_env
    ratio = 0.75
    with apply_quiet(model, k=k, ratio=ratio, mode="inplace") as h:
        inplace = last_logits(model, prompt)
        kept_inplace = h.stats.kept_visual_positions[0].tolist()
        gen_inplace = generate(model, prompt)
    with apply_quiet(model, k=k, ratio=ratio, mode="mask") as h:
        mask = last_logits(model, prompt)
        kept_mask = h.stats.kept_visual_positions[0].tolist()
        gen_mask = generate(model, prompt)
    assert kept_inplace == kept_mask
    torch.testing.assert_close(inplace, mask, atol=1e-5, rtol=0)
    assert gen_inplace == gen_mask


@cases()
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_keep_count_over_all_visual_tokens(case_env, ratio):
    model, prompt, n_expected = case_env
    ids = prompt["input_ids"]
    L = ids.shape[1]
    visual = visual_mask(model, ids)[0]
    with apply_quiet(model, k=2, ratio=ratio) as h:
        out = model(**prompt)
        st = h.stats
    keep = keep_rule(n_expected, ratio)
    assert st.num_visual == [n_expected]
    assert st.keep_count == [keep]
    kept = st.kept_visual_positions[0]
    assert len(kept) == keep
    assert bool(visual[kept].all()), "a kept 'visual' position is not an image/video token"
    assert st.pruned_length == [L - n_expected + keep]
    assert out.logits.shape[:2] == (1, L)  # scattered back to the prompt length


@cases()
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cache_lengths_per_layer(case_env, k):
    model, prompt, n = case_env
    L = prompt["input_ids"].shape[1]
    with apply_quiet(model, k=k, ratio=0.5) as h:
        out = model(**prompt, use_cache=True)
        st = h.stats
    pruned = L - n + keep_rule(n, 0.5)
    cache = cache_of(out)
    lengths = [cache.layers[i].keys.shape[-2] for i in range(NUM_LAYERS)]
    assert lengths == [L] * k + [pruned] * (NUM_LAYERS - k)
    assert st.cache_lengths == lengths


@cases()
@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75), (3, 0.5), (2, 0.9)])
def test_kept_set_equals_eager_reference(case_env, models, k, ratio):
    model, prompt, n = case_env
    scores = eager_scores(models, _family_of(models, model), prompt, k)
    visual_pos = visual_mask(model, prompt["input_ids"])[0].nonzero().flatten().tolist()
    assert len(visual_pos) == n
    with apply_quiet(model, k=k, ratio=ratio) as h:
        logits = model(**prompt).logits[0, -1]
        got = h.stats.kept_visual_positions[0].tolist()
    assert_topk(scores, visual_pos, keep_rule(n, ratio), got)
    # the wrapper around eager attention picks the same tokens and gives the same logits
    eager = models.get(_family_of(models, model), "eager")
    with apply_quiet(eager, k=k, ratio=ratio) as h:
        logits_eager = eager(**prompt).logits[0, -1]
        assert h.stats.kept_visual_positions[0].tolist() == got
    assert eager.model.language_model.config._attn_implementation == "eager"
    torch.testing.assert_close(logits_eager, logits, atol=1e-5, rtol=0)


def _family_of(models, model):
    return next(fam for (fam, impl), m in models._m.items() if m is model)


@cases(TWO_IMAGE_CASES)
@pytest.mark.parametrize("ratio", [0.7, 0.9])
def test_per_span_grouping(case_env, models, ratio):
    """Each image span keeps keep(n_i); the kept tokens of a span are its top ones by the eager reference score."""
    model, prompt, _ = case_env
    k = 2
    visual = visual_mask(model, prompt["input_ids"])[0]
    sp = spans(visual)
    assert len(sp) == 2
    scores = eager_scores(models, _family_of(models, model), prompt, k)
    with apply_quiet(model, k=k, ratio=ratio, grouping="per_span") as h:
        model(**prompt, use_cache=True)
        st = h.stats
        kept = st.kept_visual_positions[0].tolist()
    expected = [keep_rule(n, ratio) for _, n in sp]
    assert st.keep_count == [sum(expected)]
    L = prompt["input_ids"].shape[1]
    assert st.pruned_length == [L - int(visual.sum()) + sum(expected)]
    for (start, n), e in zip(sp, expected):
        in_span = [j for j in kept if start <= j < start + n]
        assert_topk(scores, list(range(start, start + n)), e, in_span)
    assert len(kept) == sum(expected)


def test_per_span_differs_from_global(models, prompts):
    """Sanity of the per-span test: the chosen ratios give per-span totals that differ from the global rule."""
    for case in TWO_IMAGE_CASES:
        model = models.get(CASES[case][0])
        sp = spans(visual_mask(model, prompts(case)["input_ids"])[0])
        n = sum(s for _, s in sp)
        assert any(sum(keep_rule(s, r) for _, s in sp) != keep_rule(n, r) for r in (0.7, 0.9)), case


@cases(["llava_next", "onevision_video", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("attached_while_saving", [False, True])
def test_save_pretrained_roundtrip(case_env, tmp_path, attached_while_saving):
    model, prompt, n = case_env
    with apply_quiet(model, k=2, ratio=0.5) as h:
        pruned_ref = model(**prompt).logits[0, -1]
        kept_ref = h.stats.kept_visual_positions[0].tolist()
    base = model(**prompt).logits
    if attached_while_saving:
        with apply_quiet(model, k=2, ratio=0.5):
            model.save_pretrained(tmp_path)
    else:
        model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    text = loaded.model.language_model
    assert text.config._attn_implementation == "sdpa"
    assert not hasattr(text, ENGINE_ATTR)
    assert torch.equal(loaded(**prompt).logits, base)
    with apply_quiet(loaded, k=2, ratio=0.0):
        assert torch.equal(loaded(**prompt).logits, base)
    with apply_quiet(loaded, k=2, ratio=0.5) as h:
        out = loaded(**prompt).logits[0, -1]
        assert h.stats.num_visual == [n] and h.stats.keep_count == [keep_rule(n, 0.5)]
        assert h.stats.kept_visual_positions[0].tolist() == kept_ref
    torch.testing.assert_close(out, pruned_ref, atol=1e-6, rtol=0)
    assert torch.equal(loaded(**prompt).logits, base)


def test_library_video_prompt_helper(models):
    """The package's own video prompt builder (fixed for transformers 5.17 during this work) matches ours on the
    installed transformers."""
    model = models.get("llava_onevision")
    lib = onevision_video_prompt(model, frames=4, seed=5)
    ours = video_prompt(model, frames=4, seed=5)
    assert torch.equal(lib["input_ids"], ours["input_ids"])
    assert torch.equal(lib["pixel_values_videos"], ours["pixel_values_videos"])
