"""An independent reference implementation of FastV (arXiv 2403.06764), and the library checked against it.

The reference shares no code with `mllm_efficiency`: it re-implements the Llama / Qwen2 decoder stack from
the model's weights in float64 (RMSNorm, q/k/v projections, RoPE from `rope_theta`, grouped-query attention
with an explicit softmax, SwiGLU MLP, final norm and LM head), so it sees the full post-softmax attention
matrix of every layer. FastV on top of it, as the paper's code does it:

* layers 0 .. K-1 run on all L tokens;
* at layer K-1 the score of visual token j is the post-softmax attention of the LAST query row to key j,
  averaged over all query heads (the softmax runs over every key the row sees; visual columns are sliced after);
* keep the top keep(N, R) = clamp(round(N * (1 - R)), 1, N) visual tokens (ties: lower position first);
  text tokens are always kept;
* layers K .. T-1 run on the kept tokens only, with their ORIGINAL position ids (RoPE of the original
  positions) and a causal mask; `positions="renumber"` uses 0 .. L'-1 instead;
* final norm + lm_head on the last token.

The inputs embeddings of a LLaVA prompt are captured with a forward pre-hook on the unmodified model's
language model. Generation is checked with a no-cache greedy loop: with a fixed ("static") kept set and a
causal model, recomputing the whole sequence at every step equals decoding with a KV cache, so the loop
exercises the library's cache bookkeeping (per-layer lengths, positions of new tokens) independently.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CACHE_KW, apply_quiet, cache_of, keep_rule
from mllm_efficiency.testing import IMAGE_TOKEN

DT = torch.float64
TOL = 1e-4


# --------------------------------------------------------------------------------------------- reference
class ManualDecoder:
    """A Llama/Qwen2 decoder stack evaluated by hand from the weights (float64, single sample)."""

    def __init__(self, text_model, lm_head):
        cfg = text_model.config
        assert cfg.hidden_act == "silu"
        rope = getattr(cfg, "rope_parameters", None) or {}
        assert rope.get("rope_type", "default") == "default"
        self.theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self.H = cfg.num_attention_heads
        self.Hkv = cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.eps = cfg.rms_norm_eps

        def w(lin):
            return lin.weight.detach().to(DT), (None if lin.bias is None else lin.bias.detach().to(DT))

        self.layers = []
        for layer in text_model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight.detach().to(DT), ln2=layer.post_attention_layernorm.weight.detach().to(DT),
                q=w(a.q_proj), k=w(a.k_proj), v=w(a.v_proj), o=w(a.o_proj),
                gate=w(m.gate_proj), up=w(m.up_proj), down=w(m.down_proj)))
        self.norm = text_model.norm.weight.detach().to(DT)
        self.head = w(lm_head)
        self.embed = text_model.embed_tokens.weight.detach().to(DT)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _rms(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, pos):
        inv = 1.0 / (self.theta ** (torch.arange(0, self.D, 2, dtype=DT) / self.D))
        freqs = pos.to(DT)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos(), emb.sin()

    @staticmethod
    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    def layer(self, i, h, pos):
        """One decoder layer on h (S, d) with position ids `pos` (S,), causal over slots.
        Returns (new h, post-softmax attention (H, S, S))."""
        W = self.layers[i]
        S = h.shape[0]
        x = self._rms(h, W["ln1"])
        q = F.linear(x, *W["q"]).view(S, self.H, self.D).transpose(0, 1)
        k = F.linear(x, *W["k"]).view(S, self.Hkv, self.D).transpose(0, 1)
        v = F.linear(x, *W["v"]).view(S, self.Hkv, self.D).transpose(0, 1)
        cos, sin = self._rope(pos)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        g = self.H // self.Hkv  # query head h reads kv head h // g
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.D)
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        o = (probs @ v).transpose(0, 1).reshape(S, self.H * self.D)
        h = h + F.linear(o, *W["o"])
        x = self._rms(h, W["ln2"])
        h = h + F.linear(F.silu(F.linear(x, *W["gate"])) * F.linear(x, *W["up"]), *W["down"])
        return h, probs

    def logits(self, h_last):
        return F.linear(self._rms(h_last, self.norm), *self.head)


def reference_scores(probs, visual, scorer, head_reduce="mean", row_reduce="mean"):
    """Score of every position (only visual ones are used) from layer K-1's attention (H, L, L)."""
    A = probs.mean(0) if head_reduce == "mean" else probs.amax(0)  # over query heads -> (L, L)
    L = A.shape[0]
    rows = (lambda x: x.mean(0)) if row_reduce == "mean" else (lambda x: x.amax(0))
    if scorer == "last_row":
        return A[-1]
    if scorer == "all_rows":  # paper wording: mean over the rows i >= j that can see key j
        return torch.stack([rows(A[j:, j]) for j in range(L)])
    if scorer == "text_rows":  # rows after the last visual token
        first = int(torch.nonzero(visual).max()) + 1
        return rows(A[first:])
    raise ValueError(scorer)


def top_visual(scores, visual_positions, keep):
    """Top `keep` visual positions by score; ties go to the lower position. Returned sorted."""
    ranked = sorted(visual_positions, key=lambda j: (-float(scores[j]), j))
    return sorted(ranked[:keep])


def reference_fastv(dec, embeds, visual, k, ratio, scorer="last_row", positions="original", kept=None,
                    grouping="global", all_logits=False, head_reduce="mean", row_reduce="mean"):
    """FastV on the manual decoder. embeds (S, d) may extend past the prompt (generated tokens): the
    score row is then the last PROMPT token only if `kept` is given (static decode); `visual` (S,) bool.
    Returns (logits of the last token (or all kept tokens), sorted kept visual positions)."""
    S = embeds.shape[0]
    vis_pos = torch.nonzero(visual).flatten().tolist()
    idx = torch.arange(S)
    h = embeds.to(DT)
    probs_prev = None
    for i in range(dec.num_layers):
        if i == k:
            if kept is None:
                if grouping == "per_span":
                    spans, cur = [], []
                    for j in vis_pos:
                        if cur and j != cur[-1] + 1:
                            spans.append(cur)
                            cur = []
                        cur.append(j)
                    spans.append(cur)
                else:
                    spans = [vis_pos]
                scores = reference_scores(probs_prev, visual, scorer, head_reduce, row_reduce)
                kept = sorted(sum((top_visual(scores, sp, keep_rule(len(sp), ratio)) for sp in spans), []))
            kept_set = set(kept)
            slots = [j for j in range(S) if not visual[j] or j in kept_set]
            h, idx = h[slots], idx[slots]
        pos = idx if (i < k or positions == "original") else torch.arange(idx.shape[0])
        h, probs = dec.layer(i, h, pos)
        probs_prev = probs
    if all_logits:
        return dec.logits(h), kept, idx
    return dec.logits(h[-1]), kept


def llava_embeds(model, inputs):
    """inputs_embeds the LLaVA model hands its language model (image features scattered in), captured
    by a pre-hook on the unmodified model."""
    captured = {}

    def hook(module, args, kwargs):
        captured["e"] = kwargs["inputs_embeds"].detach().clone()

    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured["e"][0]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dec(llava):
    return ManualDecoder(llava.model.language_model, llava.lm_head)


@pytest.fixture(scope="module")
def emb1(llava, prompt1):
    return llava_embeds(llava, prompt1)


@pytest.fixture(scope="module")
def emb2(llava, prompt2):
    return llava_embeds(llava, prompt2)


def visual_of(inputs):
    return inputs["input_ids"][0] == IMAGE_TOKEN


# --------------------------------------------------------------------------------------------- self-checks
def test_reference_matches_unmodified_model(llava, prompt1, dec, emb1):
    """The hand-written decoder reproduces the unmodified model (this validates the reference itself)."""
    logits = llava(**prompt1).logits[0]
    dec_h = emb1.to(DT)
    pos = torch.arange(dec_h.shape[0])
    for i in range(dec.num_layers):
        dec_h, _ = dec.layer(i, dec_h, pos)
    ref = dec.logits(dec_h)
    torch.testing.assert_close(logits.to(DT), ref, atol=TOL, rtol=0)


def test_reference_attention_matches_eager(llava, llava_eager, prompt1, dec, emb1):
    """The reference's attention probabilities equal transformers' eager attention weights (layer 0, 1)."""
    out = llava_eager(**prompt1, output_attentions=True)
    h = emb1.to(DT)
    pos = torch.arange(h.shape[0])
    for i in range(2):
        h, probs = dec.layer(i, h, pos)
        torch.testing.assert_close(out.attentions[i][0].to(DT), probs, atol=1e-5, rtol=0)


def test_reference_full_keep_is_identity(dec, emb1, prompt1):
    """keep == N (ratio 0) in the reference is exactly the plain forward."""
    vis = visual_of(prompt1)
    a, kept = reference_fastv(dec, emb1, vis, 2, 0.0)
    h = emb1.to(DT)
    for i in range(dec.num_layers):
        h, _ = dec.layer(i, h, torch.arange(h.shape[0]))
    torch.testing.assert_close(a, dec.logits(h[-1]), atol=0, rtol=0)
    assert kept == torch.nonzero(vis).flatten().tolist()


# --------------------------------------------------------------------------------------------- FastV vs reference
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_fastv_matches_reference(llava, prompt1, dec, emb1, k, ratio):
    """Library FastV (inplace, sdpa, default last_row scorer) == the independent reference."""
    ref_logits, ref_kept = reference_fastv(dec, emb1, visual_of(prompt1), k, ratio)
    with apply_quiet(llava, k=k, ratio=ratio) as h:
        out = llava(**prompt1)
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
        assert h.stats.keep_count == [keep_rule(16, ratio)]
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75), (3, 0.9)])
def test_fastv_two_images_matches_reference(llava, prompt2, dec, emb2, k, ratio):
    """Two images with text between them: one quota over both images, ranked together."""
    ref_logits, ref_kept = reference_fastv(dec, emb2, visual_of(prompt2), k, ratio)
    with apply_quiet(llava, k=k, ratio=ratio) as h:
        out = llava(**prompt2)
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
        assert h.stats.keep_count == [keep_rule(32, ratio)]
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("k,ratio", [(2, 0.5), (1, 0.75)])
def test_fastv_eager_backend_matches_reference(llava_eager, prompt1, dec, emb1, k, ratio):
    """The eager backend (same weights) gives the same kept set and logits as the reference."""
    ref_logits, ref_kept = reference_fastv(dec, emb1, visual_of(prompt1), k, ratio)
    with apply_quiet(llava_eager, k=k, ratio=ratio) as h:
        out = llava_eager(**prompt1)
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["inplace", "mask"])
def test_fastv_all_kept_logits_match_reference(llava, prompt2, dec, emb2, mode):
    """Every kept position's logits (not only the last) equal the reference; dropped slots are zeros."""
    ref, kept, idx = reference_fastv(dec, emb2, visual_of(prompt2), 2, 0.5, all_logits=True)
    with apply_quiet(llava, k=2, ratio=0.5, mode=mode):
        logits = llava(**prompt2).logits[0]
    assert logits.shape == (40, 128)
    torch.testing.assert_close(logits[idx].to(DT), ref, atol=TOL, rtol=0)
    if mode == "inplace":
        dropped = sorted(set(torch.nonzero(visual_of(prompt2)).flatten().tolist()) - set(kept))
        assert torch.equal(logits[dropped], torch.zeros_like(logits[dropped]))


@pytest.mark.parametrize("scorer", ["all_rows", "text_rows"])
@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75)])
def test_other_scorers_match_reference(llava, prompt2, dec, emb2, scorer, k, ratio):
    """all_rows: mean over rows i >= j of A[i, j]; text_rows: mean over rows after the last visual token."""
    ref_logits, ref_kept = reference_fastv(dec, emb2, visual_of(prompt2), k, ratio, scorer=scorer)
    with apply_quiet(llava, k=k, ratio=ratio, scorer=scorer) as h:
        out = llava(**prompt2)
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("cfg", [dict(head_reduce="max"), dict(scorer="all_rows", row_reduce="max"),
                                 dict(scorer="text_rows", head_reduce="max", row_reduce="max")])
def test_max_reductions_match_reference(llava, prompt2, dec, emb2, cfg):
    """Options: max over heads instead of mean, max over rows (Focus) instead of mean."""
    ref_logits, ref_kept = reference_fastv(dec, emb2, visual_of(prompt2), 2, 0.75, **cfg)
    with apply_quiet(llava, k=2, ratio=0.75, **cfg) as h:
        out = llava(**prompt2)
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


def test_all_rows_differs_from_last_row(dec, emb2, prompt2):
    """Guard: on this prompt the two scorers rank differently, so the all_rows test is not vacuous."""
    vis = visual_of(prompt2)
    _, a = reference_fastv(dec, emb2, vis, 2, 0.75, scorer="all_rows")
    _, b = reference_fastv(dec, emb2, vis, 2, 0.75, scorer="last_row")
    assert a != b


def test_per_span_matches_reference(llava, prompt3, dec):
    """grouping='per_span': each image keeps keep(16, R) of its own tokens, ranked within the image."""
    emb = llava_embeds(llava, prompt3)
    vis = visual_of(prompt3)
    ref_logits, ref_kept = reference_fastv(dec, emb, vis, 2, 0.9, grouping="per_span")
    with apply_quiet(llava, k=2, ratio=0.9, grouping="per_span") as h:
        out = llava(**prompt3)
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
        assert h.stats.keep_count == [3 * keep_rule(16, 0.9)]
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("k,ratio", [(1, 0.5), (2, 0.75)])
def test_renumber_positions_match_reference(llava, prompt1, dec, emb1, k, ratio):
    """positions='renumber': layers >= K see the kept tokens at contiguous positions 0 .. L'-1."""
    vis = visual_of(prompt1)
    ref_logits, ref_kept = reference_fastv(dec, emb1, vis, k, ratio, positions="renumber")
    orig_logits, _ = reference_fastv(dec, emb1, vis, k, ratio)
    assert (ref_logits - orig_logits).abs().max() > 1e-3  # the two position schemes are distinguishable
    with apply_quiet(llava, k=k, ratio=ratio, positions="renumber") as h:
        out = llava(**prompt1)
        assert h.stats.kept_visual_positions[0].tolist() == ref_kept
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


def test_k0_random_matches_reference_with_library_kept_set(llava, prompt1, dec, emb1):
    """K = 0 (random scorer): a plain drop before layer 0 with original positions. The random choice is
    the library's; the reference recomputes the logits for that kept set."""
    with apply_quiet(llava, k=0, ratio=0.5, scorer="random") as h:
        out = llava(**prompt1)
        kept = h.stats.kept_visual_positions[0].tolist()
    assert len(kept) == 8 and set(kept) <= set(range(3, 19))
    ref_logits, _ = reference_fastv(dec, emb1, visual_of(prompt1), 0, 0.5, kept=kept)
    torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------- generation
def reference_greedy_scores(dec, emb, visual, k, kept, tokens, positions="original"):
    """Per-step logits of a no-cache greedy loop with a static kept set, teacher-forced on `tokens`."""
    steps = []
    seq = emb.to(DT)
    vis = visual.clone()
    for t in range(len(tokens)):
        logits, _ = reference_fastv(dec, seq, vis, k, None, kept=kept, positions=positions)
        steps.append(logits)
        seq = torch.cat([seq, dec.embed[tokens[t]][None]], 0)
        vis = torch.cat([vis, torch.zeros(1, dtype=torch.bool)])
    return torch.stack(steps)


@pytest.mark.parametrize("k,ratio,positions", [(1, 0.5, "original"), (2, 0.75, "original"),
                                               (3, 0.25, "original"), (2, 0.75, "renumber")])
def test_generate_with_cache_matches_reference_loop(llava, prompt1, dec, emb1, k, ratio, positions):
    """Cached decoding after a pruned prefill: layers < K attend the whole prompt, layers >= K only the
    kept tokens, and new tokens continue the original numbering (L, L+1, ...; renumber: L', L'+1, ...).
    Every step's logits equal the reference loop, and every greedy token equals the reference argmax."""
    n = 5
    with apply_quiet(llava, k=k, ratio=ratio, positions=positions) as h:
        gen = llava.generate(**prompt1, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        kept = h.stats.kept_visual_positions[0].tolist()
    tokens = gen.sequences[0, prompt1["input_ids"].shape[1]:].tolist()
    ref = reference_greedy_scores(dec, emb1, visual_of(prompt1), k, kept, tokens, positions=positions)
    lib = torch.cat(gen.logits, 0).to(DT)
    torch.testing.assert_close(lib, ref, atol=TOL, rtol=0)
    assert tokens == ref.argmax(-1).tolist()


def test_manual_decode_loop_on_returned_cache_matches_reference(llava, prompt2, dec, emb2):
    """A hand-written loop (no generate, no position_ids) that passes the returned cache back."""
    with apply_quiet(llava, k=2, ratio=0.75) as h:
        out = llava(**prompt2, use_cache=True)
        kept = h.stats.kept_visual_positions[0].tolist()
        cache = cache_of(out)
        logits, tokens = [out.logits[0, -1]], []
        for _ in range(3):
            tok = logits[-1].argmax().view(1, 1)
            tokens.append(int(tok))
            out = llava(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
            cache = cache_of(out)
            logits.append(out.logits[0, -1])
    ref = reference_greedy_scores(dec, emb2, visual_of(prompt2), 2, kept, tokens + [0])
    torch.testing.assert_close(torch.stack(logits).to(DT), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_multi_token_continuation_matches_reference(llava, prompt1, dec, emb1, k):
    """A later turn of 3 tokens at once on the pruned cache (the mask of several new queries over a
    pruned layer is built from original positions): logits of all 3 new tokens equal the reference."""
    new = torch.tensor([[40, 41, 42]])
    with apply_quiet(llava, k=k, ratio=0.75, scorer="random" if k == 0 else "last_row") as h:
        out = llava(**prompt1, use_cache=True)
        kept = h.stats.kept_visual_positions[0].tolist()
        out2 = llava(input_ids=new, **{CACHE_KW: cache_of(out)}, use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in cache_of(out2).layers]
    assert lengths == [22 + 3] * k + [10 + 3] * (4 - k)
    seq = torch.cat([emb1.to(DT), dec.embed[new[0]]])
    vis = torch.cat([visual_of(prompt1), torch.zeros(3, dtype=torch.bool)])
    ref, _, _ = reference_fastv(dec, seq, vis, k, None, kept=kept, all_logits=True)
    torch.testing.assert_close(out2.logits[0].to(DT), ref[-3:], atol=TOL, rtol=0)


def _gen_cache(gen):
    c = getattr(gen, "past_key_values", None)
    return c if c is not None else gen.cache


@pytest.mark.parametrize("k", [1, 3])
def test_second_turn_generate_on_pruned_cache_matches_reference(llava, prompt1, dec, emb1, k):
    """generate() again on the cache returned by a pruned generate, with 2 new user tokens appended: the
    kept set stays static and the second turn continues the original numbering."""
    with apply_quiet(llava, k=k, ratio=0.75) as h:
        g = llava.generate(**prompt1, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           return_dict_in_generate=True)
        kept = h.stats.kept_visual_positions[0].tolist()
        seq = torch.cat([g.sequences, torch.tensor([[40, 41]])], 1)
        g2 = llava.generate(input_ids=seq, **{CACHE_KW: _gen_cache(g)}, max_new_tokens=3, min_new_tokens=3,
                            do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert h.stats.prefills == 1  # the second turn is a continuation, not a new prefill
    toks = g2.sequences[0, 22:].tolist()
    assert toks[3:5] == [40, 41]
    full = torch.cat([emb1.to(DT), dec.embed[torch.tensor(toks[:5])]])
    vis = torch.cat([visual_of(prompt1), torch.zeros(5, dtype=torch.bool)])
    ref = reference_greedy_scores(dec, full, vis, k, kept, toks[5:])
    torch.testing.assert_close(torch.cat(g2.logits).to(DT), ref, atol=TOL, rtol=0)
    assert toks[5:] == ref.argmax(-1).tolist()


def test_second_turn_generate_refused_at_k0(llava, prompt1):
    """At K = 0 layer 0 itself is short, so generate() would re-slice the new input by the wrong length:
    the library must refuse (naming position_ids) instead of silently mis-numbering."""
    with apply_quiet(llava, k=0, ratio=0.75, scorer="random"):
        g = llava.generate(**prompt1, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                           return_dict_in_generate=True)
        seq = torch.cat([g.sequences, torch.tensor([[40, 41]])], 1)
        with pytest.raises(ValueError, match="position_ids"):
            llava.generate(input_ids=seq, **{CACHE_KW: _gen_cache(g)}, max_new_tokens=2, do_sample=False)


# --------------------------------------------------------------------------------------------- Qwen2 text model
def test_qwen2_fake_span_matches_reference(qwen2):
    """Qwen2 (q/k/v biases) with a fake image span given by start/length: same as the reference."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (1, 28), generator=g)
    start, n = 4, 16
    dec = ManualDecoder(qwen2.model, qwen2.lm_head)
    emb = qwen2.model.embed_tokens(ids)[0]
    vis = torch.zeros(28, dtype=torch.bool)
    vis[start:start + n] = True
    for k, ratio in [(1, 0.5), (2, 0.75)]:
        ref_logits, ref_kept = reference_fastv(dec, emb, vis, k, ratio)
        with apply_quiet(qwen2, k=k, ratio=ratio, image_token_start_index=start, image_token_length=n) as h:
            out = qwen2(input_ids=ids)
            assert h.stats.kept_visual_positions[0].tolist() == ref_kept
        torch.testing.assert_close(out.logits[0, -1].to(DT), ref_logits, atol=TOL, rtol=0)

