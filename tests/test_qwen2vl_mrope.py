"""FastV on Qwen2-VL / Qwen2.5-VL (M-RoPE) against an in-test reference that gathers M-RoPE columns.

Reference (shares nothing with the library's pruning code):
* the merged `inputs_embeds` and the position ids the wrapper hands its language model are captured with a
  forward pre-hook on `model.model.language_model` of the unmodified model;
* the 3-D (temporal, height, width) positions of the FULL prompt are computed here from the M-RoPE rules
  (text p, p+1, ... in all rows; an image of merged grid gh x gw at offset p gets (p, p+row, p+col), then
  p += max(gh, gw)) and checked against `model.model.get_rope_index(...)` and the captured ids;
* layers 0..K-1 run (the model's own decoder layers, called directly, no cache) on all tokens; the score row is
  computed here in float64 from layer K-1's q/k (input norm, q/k projections, rotate-half RoPE with the M-RoPE
  cos/sin, GQA, softmax over all keys of the last row, mean over heads), checked against an eager copy's
  attention; the top keep(N, R) visual tokens (ties: lower position) are kept with all text tokens;
* layers K..T-1 run on the hidden states gathered at `kept` with
  `position_embeddings = language_model.rotary_emb(h_kept, pos3[..., kept])` (and text position ids gathered
  when the wrapper passed 4 rows), then final norm + lm_head on the last token.
Renumbering the kept tokens 0..n-1 (or using their sequence indices as positions in all three rows, the
community-port bug) gives different logits, so the comparison can fail.
Decoding: greedy tokens with FastV equal mask mode and a no-cache reference loop whose new tokens get
M-RoPE position (L + t) + rope_delta in every row; the positions the model sees while decoding are checked,
and `model.model.rope_deltas` is the unpruned one.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mllm_efficiency as me
from conftest import CACHE_KW, ENGINE_ATTR, apply_quiet, cache_of, family_models, keep_rule
from mllm_efficiency.testing.tiny import (
    QWEN_IMAGE, QWEN_VEND, QWEN_VIDEO, QWEN_VSTART, qwen_vl_prompt, tiny_qwen2_5_vl, tiny_qwen2_vl,
)

TOL = 1e-4
NUM_LAYERS = 4
GRIDS = ((1, 4, 8), (1, 8, 12))  # 2 x 4 and 4 x 6 merged grids: 8 + 24 = 32 image tokens
BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}
FAMILIES = list(BUILDERS)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def models():
    return family_models(BUILDERS, NUM_LAYERS)


@pytest.fixture(scope="module")
def prompt():
    return qwen_vl_prompt(grids=GRIDS, prefix=(5, 6, 10), between=(20, 21, 22), suffix=(7, 8, 9, 11), seed=3)


@pytest.fixture(params=FAMILIES)
def family(request, models):
    yield request.param
    text = models(request.param).model.language_model
    assert not hasattr(text, ENGINE_ATTR) and text.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------------------------- reference
def own_mrope_positions(input_ids, grids, merge=2, video_grids=()):
    """(3, 1, L) M-RoPE positions written out from the Qwen2-VL rules: an image or video of merged grid
    t x gh x gw at offset p gets (p + ti, p + row, p + col); then p += max(gh, gw)."""
    ids = input_ids[0].tolist()
    rows, p, i = [], 0, 0
    g = {QWEN_IMAGE: iter(grids), QWEN_VIDEO: iter(video_grids)}
    while i < len(ids):
        if ids[i] in g:
            t, h, w = next(g[ids[i]])
            gh, gw = h // merge, w // merge
            rows += [(p + ti, p + r, p + c) for ti in range(t) for r in range(gh) for c in range(gw)]
            i += t * gh * gw
            p += max(gh, gw)
        else:
            rows.append((p, p, p))
            p += 1
            i += 1
    return torch.tensor(rows).T.unsqueeze(1)


def capture_lm_inputs(model, inputs):
    """inputs_embeds and position_ids the wrapper passes to its language model (unmodified model)."""
    got = {}

    def hook(module, args, kwargs):
        got["embeds"] = kwargs["inputs_embeds"].detach().clone()
        got["pos"] = kwargs["position_ids"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return got["embeds"], got["pos"]


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


def last_row_scores(layer, h, cos, sin):
    """Post-softmax attention of the last query row over all keys, mean over heads, float64, from the layer's
    weights: (L,)."""
    attn = layer.self_attn
    cfg = attn.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = attn.head_dim
    L = h.shape[1]
    x = layer.input_layernorm(h).double()
    q = F.linear(x, attn.q_proj.weight.double(), attn.q_proj.bias.double()).view(1, L, H, D).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight.double(), attn.k_proj.bias.double()).view(1, L, Hkv, D).transpose(1, 2)
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    k = k.repeat_interleave(H // Hkv, dim=1)
    logits = q[:, :, -1:, :] @ k.transpose(-1, -2) / D ** 0.5  # the last row sees every key
    return torch.softmax(logits, -1)[0, :, 0, :].mean(0)


def run_layers(lm, h, layers, pos3, text_pos):
    pe = lm.rotary_emb(h, pos3)
    for i in layers:
        h = lm.layers[i](h, attention_mask=None, position_ids=text_pos, position_embeddings=pe, use_cache=False)
    return h


def reference(model, embeds, pos3, visual, k, ratio, text_pos=None, positions="original", kept_vis=None):
    """FastV by hand. embeds (1, S, d); pos3 (3, 1, S); visual (S,) bool; text_pos (1, S) or None.
    `kept_vis` fixes the kept visual positions (static decode); otherwise they are chosen from the last row.
    Returns (last-token logits, kept visual positions, layer k-1 scores)."""
    lm = model.model.language_model
    h = run_layers(lm, embeds, range(k - 1), pos3, text_pos)
    cos, sin = lm.rotary_emb(h, pos3)
    scores = last_row_scores(lm.layers[k - 1], h, cos, sin)
    h = run_layers(lm, h, [k - 1], pos3, text_pos)
    vis_pos = visual.nonzero().flatten().tolist()
    if kept_vis is None:
        ranked = sorted(vis_pos, key=lambda j: (-float(scores[j]), j))
        kept_vis = sorted(ranked[:keep_rule(len(vis_pos), ratio)])
    kept = torch.tensor(sorted(set(range(embeds.shape[1])) - set(vis_pos) | set(kept_vis)))
    h = h[:, kept]
    n = kept.shape[0]
    if positions == "original":
        p3 = pos3[..., kept]
        tp = None if text_pos is None else text_pos[..., kept]
    elif positions == "renumber":
        p3 = torch.arange(n).view(1, 1, n).expand(3, 1, n)
        tp = None if text_pos is None else torch.arange(n).view(1, n)
    elif positions == "index_rows":  # the sequence index of each kept token, copied into all three rows
        p3 = kept.view(1, 1, n).expand(3, 1, n)
        tp = None if text_pos is None else kept.view(1, n)
    h = run_layers(lm, h, range(k, NUM_LAYERS), p3, tp)
    return model.lm_head(lm.norm(h))[0, -1], kept_vis, scores


def full_pos3(model, inputs):
    return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs.get("image_grid_thw"),
                                      video_grid_thw=inputs.get("video_grid_thw"))


VIDEO_GRID = (2, 4, 8)  # 2 temporal patches (4 frames) of 4 x 8 patches -> 16 video tokens


def image_video_prompt(seed=0):
    """One image (grid 1x4x8) and one video in a prompt: image token 150 and video token 151."""
    g = torch.Generator().manual_seed(seed)
    n_img, n_vid = 8, 16
    ids = torch.tensor([[5, 6, QWEN_VSTART] + [QWEN_IMAGE] * n_img + [QWEN_VEND, 20, 21, QWEN_VSTART]
                        + [QWEN_VIDEO] * n_vid + [QWEN_VEND, 7, 8, 9]])
    mm = (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int()
    return dict(input_ids=ids, mm_token_type_ids=mm, pixel_values=torch.randn(4 * n_img, 96, generator=g),
                image_grid_thw=torch.tensor([GRIDS[0]]), pixel_values_videos=torch.randn(4 * n_vid, 96, generator=g),
                video_grid_thw=torch.tensor([VIDEO_GRID]))


# --------------------------------------------------------------------------------------------- tests
def test_positions_equal_get_rope_index_and_captured(models, family, prompt):
    model = models(family)
    own = own_mrope_positions(prompt["input_ids"], GRIDS)
    pos3, deltas = full_pos3(model, prompt)
    assert torch.equal(pos3, own)
    assert int(deltas.flatten()[0]) == int(own.max()) + 1 - prompt["input_ids"].shape[1]
    _, captured = capture_lm_inputs(model, prompt)
    assert captured.shape[0] == 3 and torch.equal(captured, own)
    # not a degenerate layout: image tokens have distinct height/width rows
    vis = prompt["input_ids"][0] == QWEN_IMAGE
    assert not torch.equal(own[1, 0, vis], own[2, 0, vis])


def test_reference_scores_equal_eager_attention(models, family, prompt):
    """The hand-computed score row equals an eager copy's attention row (validates the reference)."""
    model = models(family)
    embeds, _ = capture_lm_inputs(model, prompt)
    pos3 = own_mrope_positions(prompt["input_ids"], GRIDS)
    visual = prompt["input_ids"][0] == QWEN_IMAGE
    eager = models(family, "eager")
    att = eager(**prompt, output_attentions=True).attentions
    for k in (1, 2, 3):
        _, _, scores = reference(model, embeds, pos3, visual, k, 0.5)
        torch.testing.assert_close(scores, att[k - 1][0, :, -1].double().mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rows", [3, 4])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_fastv_equals_mrope_reference(models, family, prompt, k, ratio, rows):
    """rows=3: the wrapper computes (3, B, L) ids itself; rows=4: (4, B, L) ids (text row first) are passed in,
    as generate() does, so the text row must be gathered too."""
    model = models(family)
    embeds, _ = capture_lm_inputs(model, prompt)
    pos3, _ = full_pos3(model, prompt)
    L = prompt["input_ids"].shape[1]
    text_pos = None
    inputs = dict(prompt)
    if rows == 4:
        text_pos = torch.arange(L).unsqueeze(0)
        inputs["position_ids"] = torch.cat([text_pos.unsqueeze(0), pos3], 0)
        _, captured = capture_lm_inputs(model, inputs)
        assert captured.shape[0] == 4
    visual = prompt["input_ids"][0] == QWEN_IMAGE
    ref, ref_kept, _ = reference(model, embeds, pos3, visual, k, ratio, text_pos)
    with apply_quiet(model, k=k, ratio=ratio) as h:
        out = model(**inputs).logits[0, -1]
        st = h.stats
    n = int(visual.sum())
    assert st.num_visual == [n] and st.keep_count == [keep_rule(n, ratio)]
    assert st.kept_visual_positions[0].tolist() == ref_kept
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    # the comparison can fail: other positions for the kept tokens give other logits
    for wrong in ("renumber", "index_rows"):
        bad, _, _ = reference(model, embeds, pos3, visual, k, ratio, text_pos, positions=wrong,
                              kept_vis=ref_kept)
        assert (bad - out).abs().max() > 2 * TOL, wrong


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75)])
def test_fastv_equals_mrope_reference_image_and_video(models, family, k, ratio):
    """Image and video tokens in one prompt: both are visual, the video's temporal row is gathered too."""
    model = models(family)
    inputs = image_video_prompt(seed=5)
    embeds, captured = capture_lm_inputs(model, inputs)
    pos3, _ = full_pos3(model, inputs)
    assert torch.equal(pos3, captured)
    video = inputs["input_ids"][0] == QWEN_VIDEO
    assert pos3[0, 0, video].unique().numel() == 2  # two temporal positions
    if family == "qwen2_vl":  # Qwen2.5-VL scales the temporal row by seconds per grid
        assert torch.equal(pos3, own_mrope_positions(inputs["input_ids"], GRIDS[:1], video_grids=(VIDEO_GRID,)))
    visual = (inputs["input_ids"][0] == QWEN_IMAGE) | video
    ref, ref_kept, _ = reference(model, embeds, pos3, visual, k, ratio)
    with apply_quiet(model, k=k, ratio=ratio) as h:
        out = model(**inputs).logits[0, -1]
        assert h.stats.num_visual == [24] and h.stats.keep_count == [keep_rule(24, ratio)]
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    bad, _, _ = reference(model, embeds, pos3, visual, k, ratio, positions="renumber", kept_vis=ref_kept)
    assert (bad - out).abs().max() > 2 * TOL


def test_rope_deltas_unchanged_by_pruning(models, family, prompt):
    model = models(family)
    model(**prompt)
    base = model.model.rope_deltas.clone()
    with apply_quiet(model, k=2, ratio=0.75):
        model(**prompt)
        assert torch.equal(model.model.rope_deltas, base)
    _, deltas = full_pos3(model, prompt)
    assert torch.equal(base, deltas)


def capture_decode_positions(model, inputs, n):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["position_ids"].detach().clone())

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        L = inputs["input_ids"].shape[1]
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, L:].tolist()
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75)])
def test_decode_continues_from_rope_deltas(models, family, prompt, k, ratio):
    model = models(family)
    n_new = 5
    L = prompt["input_ids"].shape[1]
    _, base_seen = capture_decode_positions(model, prompt, n_new)
    base_deltas = model.model.rope_deltas.clone()
    with apply_quiet(model, k=k, ratio=ratio, mode="inplace") as h:
        tokens, seen = capture_decode_positions(model, prompt, n_new)
        kept_vis = h.stats.kept_visual_positions[0].tolist()
        assert torch.equal(model.model.rope_deltas, base_deltas)
    with apply_quiet(model, k=k, ratio=ratio, mode="mask"):
        tokens_mask, _ = capture_decode_positions(model, prompt, n_new)
    assert tokens == tokens_mask
    # the positions the language model saw: the 4-row prefill ids, then (L + t) + delta in the M-RoPE rows
    delta = int(base_deltas.flatten()[0])
    assert len(seen) == n_new and seen[0].shape == (4, 1, L)
    for t in range(1, n_new):
        assert seen[t].shape == (4, 1, 1)
        assert seen[t][0].item() == L + t - 1
        assert seen[t][1:].flatten().tolist() == [L + t - 1 + delta] * 3
    assert all(torch.equal(a, b) for a, b in zip(seen, base_seen))
    # independent no-cache reference loop with the static kept set
    embeds, _ = capture_lm_inputs(model, prompt)
    pos3, _ = full_pos3(model, prompt)
    visual = prompt["input_ids"][0] == QWEN_IMAGE
    _, ref_kept, _ = reference(model, embeds, pos3, visual, k, ratio)
    assert ref_kept == kept_vis
    lm = model.model.language_model
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ref_tokens = []
    for t in range(n_new):
        logits, _, _ = reference(model, embeds, pos3, torch.cat([visual, torch.zeros(t, dtype=torch.bool)]), k,
                                 ratio, kept_vis=kept_vis)
        logits[eos] = float("-inf")  # min_new_tokens suppresses EOS in generate
        tok = int(logits.argmax())
        ref_tokens.append(tok)
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([[tok]]))], 1)
        p = L + t + delta
        pos3 = torch.cat([pos3, torch.full((3, 1, 1), p)], -1)
    assert tokens == ref_tokens


@pytest.mark.parametrize("k,scorer", [(0, "random"), (2, "last_row")])
def test_manual_decode_loop_positions(models, family, prompt, k, scorer):
    """A hand-written decode loop (no generate, no position_ids passed): at K = 0 layer 0's cache is pruned too,
    so positions derived from its stored length would be wrong. The M-RoPE rows the language model sees must be
    (L + t) + rope_delta, and the logits must match mask mode (which stores the full cache)."""
    model = models(family)
    L = prompt["input_ids"].shape[1]
    delta = int(full_pos3(model, prompt)[1].flatten()[0])
    logits, positions = {}, {}
    for mode in ("inplace", "mask"):
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["position_ids"].detach().clone()), with_kwargs=True)
        try:
            with apply_quiet(model, k=k, ratio=0.75, scorer=scorer, mode=mode):
                out = model(**prompt, use_cache=True)
                cache = cache_of(out)
                steps = [out.logits[0, -1]]
                for t in range(3):
                    tok = steps[-1].argmax().view(1, 1)
                    out = model(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
                    steps.append(out.logits[0, -1])
                if mode == "inplace":
                    assert cache.layers[0].keys.shape[-2] == (L - 32 + keep_rule(32, 0.75) if k == 0 else L) + 3
        finally:
            hook.remove()
        logits[mode], positions[mode] = steps, seen
    for t in range(1, 4):
        rows = positions["inplace"][t]
        assert rows.shape[-1] == 1
        assert rows[-3:].flatten().tolist() == [L + t - 1 + delta] * 3, f"decode step {t}"
    for a, b in zip(logits["inplace"], logits["mask"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_renumber_raises_config_error(models, family):
    model = models(family)
    with pytest.raises(me.ConfigError, match="renumber"):
        me.apply(model, "fastv", k=2, ratio=0.5, positions="renumber")
    text = model.model.language_model
    assert not hasattr(text, ENGINE_ATTR) and text.config._attn_implementation == "sdpa"
