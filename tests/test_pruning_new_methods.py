"""DivPrune, DART and PyramidDrop on the pruning engine: ratio 0 is exact, kept counts, the selection rules
against plain-Python re-derivations from the papers, left-padded batches equal single runs."""
from __future__ import annotations

import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.adapters import get_adapter
from conftest import keep_rule, pad_left
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = 1e-4


def _inputs_embeds(model, prompt):
    """Sample 0's embeddings at the LLM input (the adapter stops the wrapper's forward there)."""
    return get_adapter(model).merged_inputs_embeds(**prompt)[0]


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
        pos = (am.cumsum(-1) - 1).clamp_min(0)  # generate passes these; RoPE-dependent scores need them
        batch = model(input_ids=ids, attention_mask=am, position_ids=pos,
                      pixel_values=torch.cat([a_pv, b_pv])).logits[:, -1]
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


# ----------------------------------------------------------------------------------------- DART
def _dart_inputs(model, prompt, k):
    """Post-RoPE keys of layer k-1 and the hidden states entering layer k, taken with plain hooks."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    text = model.model.language_model
    got = {}
    attn = text.layers[k - 1].self_attn
    h1 = attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))
    h2 = text.layers[k].register_forward_pre_hook(lambda m, a, kw: got.__setitem__("h", (a[0] if a else kw["hidden_states"])),
                                                  with_kwargs=True)
    with torch.no_grad():
        model(**prompt)
    h1.remove()
    h2.remove()
    B, L, _ = got["k"].shape
    key = got["k"].view(B, L, -1, attn.head_dim).transpose(1, 2)
    pos = torch.arange(L).unsqueeze(0)
    cos, sin = text.rotary_emb(got["h"], pos)
    key, _ = apply_rotary_pos_emb(key, key, cos, sin)
    return key[0], got["h"][0]


def _dart_reference(key, hidden, norm, visual: list[int], text: list[int], keep: int, p_img: int, p_txt: int):
    l1 = [float(key[:, i].abs().sum()) for i in range(key.shape[1])]
    by_norm = lambda pos: sorted(pos, key=lambda i: (-l1[i], i))  # noqa: E731
    p_img = min(p_img, keep)
    p_txt = min(p_txt, len(text))
    img_piv = by_norm(visual)[:p_img]
    txt_piv = by_norm(text)[:p_txt]
    with torch.no_grad():
        states = norm(hidden).double()
    pool = [i for i in visual if i not in img_piv]
    chosen = set(img_piv)
    pivots = sorted(img_piv + txt_piv)
    remaining = keep - p_img
    for n, p in enumerate(pivots):
        quota = remaining // len(pivots) + (1 if n < remaining % len(pivots) else 0)
        ranked = sorted(pool, key=lambda i: (_cos(states[p], states[i]), i))[:quota]
        chosen.update(ranked)
        pool = [i for i in pool if i not in ranked]
    return chosen


@torch.no_grad()
def test_dart_ratio_zero_exact(llava, prompt2):
    base = llava(**prompt2).logits
    with me.apply(llava, "dart", ratio=0.0) as h:
        assert torch.equal(llava(**prompt2).logits, base)
        assert h.stats.keep_count == [32]
    assert torch.equal(llava(**prompt2).logits, base)


@pytest.mark.parametrize("k,ratio,p_img,p_txt", [(2, 0.778, 4, 4), (1, 0.5, 2, 1), (3, 0.9, 4, 4), (2, 0.25, 0, 3)])
@torch.no_grad()
def test_dart_kept_set_matches_reference(llava, prompt2, k, ratio, p_img, p_txt):
    ids = prompt2["input_ids"][0]
    visual = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
    text = list(range(visual[-1] + 1, ids.shape[0]))
    key, hidden = _dart_inputs(llava, prompt2, k)
    keep = keep_rule(32, ratio)
    expected = _dart_reference(key, hidden, llava.model.language_model.norm, visual, text, keep, p_img, p_txt)
    with me.apply(llava, "dart", k=k, ratio=ratio, pivot_image_token=p_img, pivot_text_token=p_txt) as h:
        llava(**prompt2)
        assert h.stats.keep_count == [keep]
        assert set(h.stats.kept_visual_positions[0].tolist()) == expected
        L = ids.shape[0]
        gen = llava.generate(**prompt2, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == L + 3
        assert h.stats.cache_lengths == [L] * k + [L - 32 + keep] * (4 - k)


def test_dart_left_padded_batch_equals_single_runs(llava):
    _batch_equals_single(llava, "dart", ratio=0.6)


@pytest.mark.parametrize("bad", [dict(k=0), dict(ratio=1.0), dict(pivot_image_token=0, pivot_text_token=0),
                                 dict(k=4)])
def test_dart_bad_config(llava, bad):
    with pytest.raises(me.ConfigError):
        me.apply(llava, "dart", **bad)


# ----------------------------------------------------------------------------------------- PyramidDrop
@torch.no_grad()
def _pdrop_reference(model, prompt, layers, fractions):
    """PyramidDrop written out: run the decoder layer by layer on the kept tokens (original positions); at each
    boundary l rank the visual tokens still present by the last token's attention at layer l-1 (mean over heads)
    and keep round(N * fraction) of the prompt's N. Returns (kept visual positions, last-token logits)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    text = model.model.language_model
    ids = prompt["input_ids"][0]
    N = int((ids == IMAGE_TOKEN).sum())
    h = _inputs_embeds(model, prompt).unsqueeze(0)
    kept = list(range(ids.shape[0]))
    captured = {}
    for i, layer in enumerate(text.layers):
        if i in layers:
            q, k = captured[i - 1]
            G = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(G, dim=1)
            probs = torch.softmax((q[0, :, -1:] @ k[0].transpose(-1, -2)).float() * q.shape[-1] ** -0.5, -1)
            score = probs.mean(0)[0]
            vis = [j for j, p in enumerate(kept) if ids[p] == IMAGE_TOKEN]
            n_keep = keep_rule(N, 1 - fractions[layers.index(i)])
            best = set(sorted(vis, key=lambda j: (-float(score[j]), j))[:n_keep])
            slots = [j for j in range(len(kept)) if j not in vis or j in best]
            kept = [kept[j] for j in slots]
            h = h[:, slots]
        pos = torch.tensor(kept).unsqueeze(0)
        cos, sin = text.rotary_emb(h, pos)
        n = len(kept)
        mask = torch.ones(n, n, dtype=torch.bool).tril().view(1, 1, n, n)
        attn = layer.self_attn
        got = {}
        hq = attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o))
        hk = attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        h = h[0] if isinstance(h, tuple) else h
        hq.remove()
        hk.remove()
        q = got["q"].view(1, n, -1, attn.head_dim).transpose(1, 2)
        k = got["k"].view(1, n, -1, attn.head_dim).transpose(1, 2)
        captured[i] = apply_rotary_pos_emb(q, k, cos, sin)
    logits = model.lm_head(text.norm(h))[0, -1]
    return {p for p in kept if ids[p] == IMAGE_TOKEN}, logits


def test_pdrop_lambda_mapping():
    from mllm_efficiency.pruning.pdrop import average_fraction, default_layers, lambda_for_ratio

    assert default_layers(32) == (8, 16, 24) and default_layers(4) == (1, 2, 3)
    # the paper's lambda = 0.5 on LLaVA-1.5: (8 + 8/2 + 8/4 + 8/8) / 32 = 0.46875 of the visual tokens on average
    assert average_fraction(0.5, (8, 16, 24), 32) == pytest.approx(0.46875)
    assert lambda_for_ratio(1 - 0.46875, (8, 16, 24), 32) == pytest.approx(0.5, abs=1e-9)
    assert lambda_for_ratio(0.0, (8, 16, 24), 32) == 1.0
    for r in (0.1, 0.5, 0.7):
        lam = lambda_for_ratio(r, (8, 16, 24), 32)
        assert average_fraction(lam, (8, 16, 24), 32) == pytest.approx(1 - r, abs=1e-9)
    with pytest.raises(me.ConfigError, match="not reachable"):
        lambda_for_ratio(0.8, (8, 16, 24), 32)


@torch.no_grad()
def test_pdrop_ratio_zero_exact(llava, prompt2):
    base = llava(**prompt2).logits
    with me.apply(llava, "pdrop", ratio=0.0) as h:
        assert torch.equal(llava(**prompt2).logits, base)
        assert h.stats.keep_count == [32]
    assert torch.equal(llava(**prompt2).logits, base)


@pytest.mark.parametrize("cfg,layers,fractions", [
    (dict(), (1, 2, 3), (0.5, 0.25, 0.125)),
    (dict(lambda_=0.7, layer_list=(1, 3)), (1, 3), (0.7, 0.49)),
    (dict(image_token_ratio_list=(0.6, 0.2), layer_list=(2, 3)), (2, 3), (0.6, 0.2)),
])
@torch.no_grad()
def test_pdrop_matches_reference(llava, prompt3, cfg, layers, fractions):
    expected, ref_logits = _pdrop_reference(llava, prompt3, list(layers), list(fractions))
    with me.apply(llava, "pdrop", **cfg) as h:
        out = llava(**prompt3).logits[0, -1]
        st = h.stats
        assert st.stage_keep_counts == [[keep_rule(48, 1 - f)] for f in fractions]
        assert st.keep_count == [keep_rule(48, 1 - fractions[-1])] and st.num_visual == [48]
        assert set(st.kept_visual_positions[0].tolist()) == expected
        gen = llava.generate(**prompt3, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == prompt3["input_ids"].shape[1] + 3
    torch.testing.assert_close(out, ref_logits, atol=TOL, rtol=0)


@torch.no_grad()
def test_pdrop_ratio_sets_lambda(llava, prompt3):
    with me.apply(llava, "pdrop", ratio=0.5) as h:
        llava(**prompt3)
        lam = h.stats.lambda_
        from mllm_efficiency.pruning.pdrop import average_fraction
        assert average_fraction(lam, (1, 2, 3), 4) == pytest.approx(0.5)
        assert h.stats.stage_keep_counts == [[keep_rule(48, 1 - lam ** s)] for s in (1, 2, 3)]
    with pytest.raises(me.ConfigError, match="not reachable"):
        me.apply(llava, "pdrop", ratio=0.8)


def test_pdrop_left_padded_batch_equals_single_runs(llava):
    _batch_equals_single(llava, "pdrop")


@pytest.mark.parametrize("bad", [dict(ratio=1.0), dict(lambda_=0.0), dict(layer_list=(2, 1)), dict(layer_list=(1, 4)),
                                 dict(image_token_ratio_list=(0.5, 0.6)), dict(ratio=0.3, image_token_ratio_list=(0.5,)),
                                 dict(image_token_ratio_list=(0.5, 0.25))])
def test_pdrop_bad_config(llava, bad):
    with pytest.raises(me.ConfigError):
        me.apply(llava, "pdrop", **bad)
