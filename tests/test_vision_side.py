"""VisionZip and PruMerge+ (vision side): ratio 0 is exact, kept counts, the [CLS] row against the tower's own eager
attention, the selection and merging rules against plain-Python re-derivations, the LLM against a model fed only
the compressed tokens (contiguous positions, or with positions="original" each token at its source slot's
position), left-padded batches, generate, PruMerge+'s scaled k, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mllm_efficiency as me
from conftest import CACHE_KW, cache_of, pad_left
from mllm_efficiency.errors import UnsupportedMethodError
from mllm_efficiency.pruning.prumerge import default_k, prumerge_plus_compress
from mllm_efficiency.pruning.visionzip import visionzip_compress
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt, tiny_llava

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N = 16  # patches per image of the tiny LLaVA (32x32 image, 8x8 patches)
TOL = 1e-4


def _cos(a, b) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------------------- references
def _visionzip_reference(feats, attn, keys, d: int, c: int, heads: int) -> tuple[list[torch.Tensor], list[int]]:
    """The output tokens of one image (dominant in raster order, then the groups in target order) and their
    source patches in the same order (a dominant patch itself, a group's target)."""
    n = feats.shape[0]
    a = attn.tolist()
    dom = sorted(sorted(range(n), key=lambda i: -a[i])[:d])
    rest = [i for i in range(n) if i not in dom]
    targets = rest[::max(1, len(rest) // c)][:c] if c else []
    metric = keys.double().view(n, heads, -1).mean(1)
    groups = {t: [t] for t in targets}
    for i in rest if targets else []:
        if i not in groups:
            groups[max(targets, key=lambda t: _cos(metric[i], metric[t]))].append(i)
    tokens = [feats[i].double() for i in dom] + [torch.stack([feats[j].double() for j in groups[t]]).mean(0)
                                                  for t in targets]
    return tokens, dom + targets


def _prumerge_reference(feats, attn, keys, keep: int, k: int) -> tuple[list[torch.Tensor], list[int]]:
    n = feats.shape[0]
    a = attn.double().tolist()
    q1, q3 = np.percentile(np.array(a), [25, 75])
    outliers = [i for i in range(n) if a[i] > q3 + 1.5 * (q3 - q1)]
    if len(outliers) >= keep:
        kept = sorted(sorted(outliers, key=lambda i: -a[i])[:keep])
    else:
        others = [i for i in range(n) if i not in outliers]
        m = keep - len(outliers)
        kept = sorted(outliers + [others[math.floor(j * len(others) / m)] for j in range(m)])
    pruned = [i for i in range(n) if i not in kept]
    kk = min(k, len(pruned))
    tokens = []
    for p in kept:
        near = sorted(pruned, key=lambda q: -_cos(keys[p].double(), keys[q].double()))[:kk]
        group = [p] + near
        w = sum(a[q] for q in group)
        tokens.append(sum(a[q] * feats[q].double() for q in group) / w)
    return tokens, kept


def _spiky(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g)
    logits[torch.randperm(n, generator=g)[:int(torch.randint(0, 6, (1,), generator=g))]] += 4.0  # a few outliers
    attn = torch.softmax(logits, 0)
    return torch.randn(n, 6, generator=g), attn, torch.randn(n, 8, generator=g)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("d,c", [(5, 3), (0, 4), (7, 0), (3, 1)])
def test_visionzip_rule_matches_reference(seed, d, c):
    feats, attn, keys = _spiky(seed, 24)
    out, kept = visionzip_compress(feats[None], attn[None], keys[None], d, c, heads=2)
    tokens, slots = _visionzip_reference(feats, attn, keys, d, c, heads=2)
    assert kept[0].nonzero().flatten().tolist() == sorted(slots)
    assert torch.allclose(out[0, :d + c].double(), torch.stack(tokens), atol=1e-5)
    _check_in_place(visionzip_compress(feats[None], attn[None], keys[None], d, c, heads=2, positions="original"),
                    feats, tokens, slots)


def _check_in_place(result, feats, tokens, slots):
    """positions="original": each output token sits in its source slot, every other row is the input's."""
    out, kept = result
    assert kept[0].nonzero().flatten().tolist() == sorted(slots)
    expected = feats.double().clone()
    for slot, token in zip(slots, tokens):
        expected[slot] = token
    assert torch.allclose(out[0].double(), expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("keep,k", [(6, 3), (2, 32), (12, 1), (23, 32)])
def test_prumerge_plus_rule_matches_reference(seed, keep, k):
    feats, attn, keys = _spiky(seed, 24)
    out, kept = prumerge_plus_compress(feats[None], attn[None], keys[None], keep, k)
    tokens, ref_kept = _prumerge_reference(feats, attn, keys, keep, k)
    assert kept[0].nonzero().flatten().tolist() == ref_kept
    assert torch.allclose(out[0, :keep].double(), torch.stack(tokens), atol=1e-5)
    _check_in_place(prumerge_plus_compress(feats[None], attn[None], keys[None], keep, k, positions="original"),
                    feats, tokens, ref_kept)


def test_prumerge_plus_default_k_scales_with_the_patch_count():
    """The paper's k = 32 neighbours belong to LLaVA-1.5's 576 patches; other towers get it scaled."""
    assert [default_k(n) for n in (576, 64, 16, 4, 2304)] == [32, 4, 1, 1, 128]


# ----------------------------------------------------------------------------------------- on the tiny LLaVA
@pytest.fixture(scope="module")
def model():
    return tiny_llava(num_layers=4)


@pytest.fixture(scope="module")
def prompt():
    ids, pv = llava_prompt(num_images=2, seed=1)
    return dict(input_ids=ids, pixel_values=pv)


CASES = [("visionzip", dict(ratio=0.5), 8), ("visionzip", dict(dominant=3, contextual=2), 5),
         ("visionzip", {}, 2), ("prumerge_plus", dict(ratio=0.75), 4), ("prumerge_plus", dict(ratio=0.3, k=2), 11)]


@pytest.mark.parametrize("method", ["visionzip", "prumerge_plus"])
@torch.no_grad()
def test_ratio_zero_is_the_model(model, prompt, method):
    base = model(**prompt).logits
    with me.apply(model, method, ratio=0.0) as h:
        assert torch.equal(model(**prompt).logits, base)
        assert h.stats.keep_count == [32] and h.stats.patch_keep is None
    assert torch.equal(model(**prompt).logits, base)


@torch.no_grad()
def test_cls_row_equals_the_towers_eager_attention(prompt):
    eager = tiny_llava(num_layers=4, attn_implementation={"text_config": "sdpa", "vision_config": "eager"})
    sdpa = tiny_llava(num_layers=4)
    tower = eager.model.vision_tower
    out = tower(prompt["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = len(out.attentions) - 2  # hidden_states[-2] is the output of the second-to-last layer
    expected = out.attentions[layer][:, :, 0, 1:].mean(1)
    with me.apply(sdpa, "prumerge_plus", ratio=0.5) as h:
        sdpa(**prompt)
        assert sdpa.model.vision_tower.config._attn_implementation == "sdpa"
        assert torch.allclose(h.stats.cls_attention, expected, atol=1e-6)


def test_patch_embedding_features_are_scored_by_the_first_layer(prompt):
    """vision_feature_layer pointing at the patch embeddings (the embedded shapes-vlm's setting): no layer produced
    them, so the row is the [CLS] attention of layer 0, the layer that reads them."""
    eager = tiny_llava(num_layers=4, attn_implementation={"text_config": "sdpa", "vision_config": "eager"})
    sdpa = tiny_llava(num_layers=4)
    n = len(sdpa.model.vision_tower.vision_model.encoder.layers if hasattr(sdpa.model.vision_tower, "vision_model")
            else sdpa.model.vision_tower.encoder.layers)
    for m in (eager, sdpa):
        m.config.vision_feature_layer = -(n + 1)  # hidden_states[0]: the embeddings
    out = eager.model.vision_tower(prompt["pixel_values"], output_attentions=True)
    expected = out.attentions[0][:, :, 0, 1:].mean(1)
    with me.apply(sdpa, "prumerge_plus", ratio=0.5) as h:
        sdpa(**prompt)
        assert torch.allclose(h.stats.cls_attention, expected, atol=1e-6)


def _reference_logits(model, prompt, method, cfg, keep, positions="renumber"):
    """The unmodified model fed only the compressed tokens: K placeholders per image whose embeddings are the
    projector applied to the reference rule's tokens (computed from the tower's own eager attention).
    positions="renumber": the K tokens in the rule's order at contiguous positions; "original": each token at its
    source patch's placeholder (in slot order), with that placeholder's position id. Returns (ids, embeds,
    position ids)."""
    inner = model.model
    got = {}
    attn_mod = inner.vision_tower.encoder.layers[-2].self_attn
    hooks = [attn_mod.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o)),
             inner.multi_modal_projector.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))]
    saved = inner.vision_tower.config._attn_implementation
    inner.vision_tower.config._attn_implementation = "eager"
    try:
        out = inner.vision_tower(prompt["pixel_values"], output_attentions=True, output_hidden_states=True)
        inner.get_image_features(prompt["pixel_values"], vision_feature_layer=-2,
                                 vision_feature_select_strategy="default")
    finally:
        inner.vision_tower.config._attn_implementation = saved
        for h in hooks:
            h.remove()
    attn = out.attentions[-2][:, :, 0, 1:].mean(1)
    rows, kept_slots = [], []
    for i in range(attn.shape[0]):
        if method == "visionzip":
            d, c = (cfg["dominant"], cfg["contextual"]) if "dominant" in cfg else (keep - round(keep * 5 / 32),
                                                                                    round(keep * 5 / 32))
            tokens, slots = _visionzip_reference(got["x"][i], attn[i], got["k"][i, 1:], d, c, heads=2)
        else:
            tokens, slots = _prumerge_reference(got["x"][i], attn[i], got["k"][i, 1:], keep,
                                                cfg.get("k", default_k(N)))
        if positions == "original":  # slot order
            tokens = [t for _, t in sorted(zip(slots, tokens), key=lambda st: st[0])]
            slots = sorted(slots)
        else:
            slots = range(keep)
        rows.append(torch.stack(tokens).float())
        kept_slots.append(set(slots))
    image_embeds = inner.multi_modal_projector(torch.stack(rows)).flatten(0, 1)
    ids = prompt["input_ids"][0].tolist()
    short, pos, seen = [], [], 0
    for p, t in enumerate(ids):
        if t == IMAGE_TOKEN:
            seen += 1
            if (seen - 1) % N not in kept_slots[(seen - 1) // N]:
                continue
        short.append(t)
        pos.append(p)
    short = torch.tensor([short])
    embeds = inner.get_input_embeddings()(short)
    embeds[short == IMAGE_TOKEN] = image_embeds
    pos = torch.tensor([pos]) if positions == "original" else torch.arange(short.shape[1])[None]
    return short, embeds, pos


def _greedy_reference(model, embeds, pos, length: int, n: int) -> torch.Tensor:
    """Greedy decoding of the unmodified model from the short prompt at position ids `pos`; the new tokens take
    positions length, length + 1, ... (the full prompt's continuation)."""
    out = model(inputs_embeds=embeds, position_ids=pos, use_cache=True)
    toks = []
    for t in range(n):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        out = model(input_ids=tok, **{CACHE_KW: cache_of(out)}, use_cache=True,
                    position_ids=torch.tensor([[length + t]]))
    return torch.cat(toks, 1)


@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("method,cfg,keep", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
@torch.no_grad()
def test_llm_sees_only_the_compressed_tokens(model, prompt, method, cfg, keep, positions):
    short, embeds, pos = _reference_logits(model, prompt, method, cfg, keep, positions)
    ref = model(inputs_embeds=embeds, position_ids=pos).logits[:, -1]
    L = prompt["input_ids"].shape[1]
    with me.apply(model, method, positions=positions, **cfg) as h:
        out = model(**prompt, use_cache=True)
        assert h.stats.keep_count == [2 * keep] and h.stats.num_visual == [32]
        assert h.stats.cache_lengths == [L - 32 + 2 * keep] * 4
        assert h.stats.patch_keep.sum(1).tolist() == [keep, keep]
        kept = h.stats.kept_visual_positions[0]
        visual = (prompt["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()
        expected = pos[0][short[0] == IMAGE_TOKEN] if positions == "original" else \
            visual.view(2, N)[:, :keep].flatten()
        assert torch.equal(kept, expected)
        gen = model.generate(**prompt, max_new_tokens=4, do_sample=False)[:, L:]
        fast = me.generate(model, **prompt, max_new_tokens=4)[:, L:]
    assert (out.logits[:, -1] - ref).abs().max() < TOL
    if positions == "renumber":
        ref_gen = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(short), max_new_tokens=4,
                                 do_sample=False)[:, -4:]
    else:
        ref_gen = _greedy_reference(model, embeds, pos, L, 4)
    assert torch.equal(gen, ref_gen) and torch.equal(fast, ref_gen)


@torch.no_grad()
def test_prumerge_plus_k_default_and_explicit(model, prompt):
    """k=None is default_k(N) (1 on the tiny tower's 16 patches, where the unscaled 32 would absorb all pruned
    patches into every kept token); an explicit k wins, and k above the pruned count merges all of them."""
    with me.apply(model, "prumerge_plus", ratio=0.5) as h:
        assert h.k == default_k(N) == 1
        default = model(**prompt).logits[:, -1]
    with me.apply(model, "prumerge_plus", ratio=0.5, k=1) as h:
        assert h.k == 1 and torch.equal(model(**prompt).logits[:, -1], default)
    with me.apply(model, "prumerge_plus", ratio=0.5, k=8):
        all_pruned = model(**prompt).logits[:, -1]
    with me.apply(model, "prumerge_plus", ratio=0.5, k=32) as h:
        assert h.k == 32 and torch.equal(model(**prompt).logits[:, -1], all_pruned)  # clamped to the 8 pruned
    assert not torch.allclose(default, all_pruned)


@pytest.mark.parametrize("method,cfg", [("visionzip", dict(ratio=0.6)), ("prumerge_plus", dict(ratio=0.7)),
                                        ("visionzip", dict(ratio=0.6, positions="original")),
                                        ("prumerge_plus", dict(ratio=0.7, positions="original"))])
@torch.no_grad()
def test_left_padded_batch_equals_single_runs(model, method, cfg):
    a_ids, a_pv = llava_prompt(1, suffix=(12, 13, 14, 15, 16), seed=1)
    b_ids, b_pv = llava_prompt(2, seed=2)
    ids, am = pad_left([a_ids, b_ids])
    with me.apply(model, method, **cfg) as h:
        pos = (am.cumsum(-1) - 1).clamp_min(0)
        batch = model(input_ids=ids, attention_mask=am, position_ids=pos,
                      pixel_values=torch.cat([a_pv, b_pv])).logits[:, -1]
        counts = list(h.stats.keep_count)
        gen = model.generate(input_ids=ids, attention_mask=am, pixel_values=torch.cat([a_pv, b_pv]),
                             max_new_tokens=3, do_sample=False)[:, ids.shape[1]:]
        single_a = model(input_ids=a_ids, pixel_values=a_pv).logits[:, -1]
        gen_a = model.generate(input_ids=a_ids, pixel_values=a_pv, max_new_tokens=3, do_sample=False)[:, -3:]
        single_b = model(input_ids=b_ids, pixel_values=b_pv).logits[:, -1]
        gen_b = model.generate(input_ids=b_ids, pixel_values=b_pv, max_new_tokens=3, do_sample=False)[:, -3:]
        fast = me.generate(model, input_ids=ids, attention_mask=am, pixel_values=torch.cat([a_pv, b_pv]),
                           max_new_tokens=3)[:, ids.shape[1]:]
    assert counts[1] == 2 * counts[0]
    assert (batch[0] - single_a[0]).abs().max() < TOL and (batch[1] - single_b[0]).abs().max() < TOL
    assert torch.equal(gen, torch.cat([gen_a, gen_b])) and torch.equal(fast, gen)


@pytest.mark.parametrize("method,cfg,match", [
    ("visionzip", dict(ratio=1.0), "ratio"), ("visionzip", dict(ratio=-0.1), "ratio"),
    ("visionzip", dict(dominant=5), "dominant alone"), ("visionzip", dict(contextual=2), "contextual alone"),
    ("visionzip", dict(dominant=0, contextual=0), "dominant \\+ contextual"),
    ("visionzip", dict(dominant=-1, contextual=2), "dominant"),
    ("visionzip", dict(dominant=12, contextual=6), "exceeds the 16 patch"),
    ("visionzip", dict(ratio=0.5, dominant=9), "dominant = 9 exceeds the 8"),
    ("prumerge_plus", dict(ratio=1.0), "ratio"), ("prumerge_plus", dict(k=-1), "k must"),
    ("visionzip", dict(positions="shifted"), r"visionzip: positions must be one of \['renumber', 'original'\]"),
    ("prumerge_plus", dict(positions=None), r"prumerge_plus: positions must be one of \['renumber', 'original'\]")])
def test_bad_config(model, method, cfg, match):
    with pytest.raises(me.ConfigError, match=match):
        me.apply(model, method, **cfg)


@pytest.mark.parametrize("method", ["visionzip", "prumerge_plus"])
def test_unsupported_families_are_refused(method):
    from mllm_efficiency.testing import tiny

    for build in (tiny.tiny_llava_next, tiny.tiny_qwen2_vl):
        with pytest.raises(UnsupportedMethodError, match=f"{method} is not supported"):
            me.apply(build(num_layers=2), method, ratio=0.5)


def test_they_do_not_stack_with_each_other_or_layer0_pruning(model):
    with me.apply(model, "visionzip", ratio=0.5):
        for name, cfg in [("prumerge_plus", {}), ("divprune", {}), ("fastv", dict(k=0, scorer="random"))]:
            with pytest.raises(me.ConfigError, match=f"{name} does not compose with visionzip"):
                me.apply(model, name, **cfg)
