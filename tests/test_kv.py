"""KV-cache compression: configs and budgets, identity at ratio 0, decoding on a compressed cache against a
reference that masks the dropped keys, decode-time eviction, padded batches, composition with FastV,
LLaVA and Qwen2. (Selection rules against independent references: test_kv_reference.py.)

The decoding reference never uses the library: the unmodified model decodes on its full `DynamicCache`,
and forward pre-hooks on the decoder layers give each layer a 4-D mask that hides, per query head, the
keys the method dropped in that layer (new tokens stay visible), with explicit position ids.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mllm_efficiency as me
from conftest import CACHE_KW, apply_quiet, cache_of, pad_left, text_model_of
from mllm_efficiency.core.cache import TrackedCache, TrackedLayer
from mllm_efficiency.testing import llava_prompt, tiny_llama_lm
from test_kv_reference import eager_attention, group_mean, keep_of, kept_positions, ref_snapkv, topk

KV_METHODS = ["adakv", "h2o", "l2norm", "lookm", "pyramidkv", "random", "snapkv", "streamingllm", "vlcache"]
NL, H, HKV = 4, 4, 2
TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def ids_of(L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (1, L), generator=torch.Generator().manual_seed(seed))


def gen(model, n: int, **inputs):
    """Greedy generate: (new tokens, per-step logits (B, n, V))."""
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    L = inputs["input_ids"].shape[1]
    return out.sequences[:, L:], torch.stack(out.logits, 1)


def all_kept(cache, B: int = 1):
    """kept[i][b][h]: original positions kept in layer i, sample b, KV head h."""
    return [[[kept_positions(cache, i, b, h) for h in range(HKV)] for b in range(B)] for i in range(NL)]


def evicting_decode(model, prompt: dict, steps: int, keep: int):
    """Prefill, then `steps` greedy decode steps with a decode-time eviction method attached; every layer must hold
    exactly `keep` slots after each step. Returns (fed tokens, logits per step, all_kept after each step)."""
    out = model(**prompt, use_cache=True)
    cache = cache_of(out)
    tok = out.logits[:, -1:].argmax(-1)
    tokens, logits, kept_steps = [], [], []
    for _ in range(steps):
        tokens.append(tok)
        o = model(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
        logits.append(o.logits[:, -1])
        kept_steps.append(all_kept(cache))
        assert all(cache.layers[i].keys.shape[-2] == keep for i in range(NL))
        tok = o.logits[:, -1:].argmax(-1)
    return tokens, logits, kept_steps


def compressed_decode(model, method: str, prompt: dict, steps: int, **cfg):
    """Prefill with the method, then `steps` greedy decode steps (no position ids: the library continues
    from the logical length). Returns kept sets after prefill, fed tokens, logits per step, the cache."""
    with me.apply(model, method, **cfg):
        out = model(**prompt, use_cache=True)
        cache = cache_of(out)
        kept = all_kept(cache, out.logits.shape[0])
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, logits = [], []
        for _ in range(steps):
            tokens.append(tok)
            o = model(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
            logits.append(o.logits[:, -1])
            tok = o.logits[:, -1].argmax(-1, keepdim=True)
    return kept, tokens, logits, cache


class LayerMasks:
    """Forward pre-hooks giving decoder layer i the 4-D attention mask masks[i] (the reference's tool)."""

    def __init__(self, model):
        self.masks = {}
        layers = text_model_of(model).layers
        self.handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, layer in enumerate(layers)]

    def _hook(self, i):
        def hook(module, args, kwargs):
            if i in self.masks:
                kwargs["attention_mask"] = self.masks[i]
            return args, kwargs
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def allowed_mask(kept_i, S: int, L: int, B: int, eager: bool, q: int = 1):
    """(B, H, q, S): per query head, the kept prompt positions of its KV head plus new tokens (causal)."""
    m = torch.zeros(B, H, q, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            m[b, h, :, kept_i[b][h // (H // HKV)]] = True
    for r in range(q):
        m[:, :, r, L:S - q + r + 1] = True
    if eager:
        return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    return m


def reference_decode(model, prompt: dict, kept, tokens, eager: bool = False):
    """Logits of the unmodified model decoding `tokens` on its full cache with the dropped keys masked."""
    out = model(**prompt, use_cache=True)
    cache = cache_of(out)
    B, L = out.logits.shape[:2]
    hooks = LayerMasks(model)
    logits = []
    try:
        for t, tok in enumerate(tokens):
            S = L + t + 1
            hooks.masks = {i: allowed_mask(kept[i], S, L, B, eager) for i in range(NL)}
            o = model(input_ids=tok, **{CACHE_KW: cache}, use_cache=True, position_ids=torch.full((B, 1), L + t))
            logits.append(o.logits[:, -1])
    finally:
        hooks.close()
    return logits


# ------------------------------------------------------------------------------------------ registry / config
def test_methods_registered():
    new = ["expected_attention", "keydiff", "tova"]  # tested in test_kv_new_methods.py
    assert sorted(me.available_methods(family="kv")) == sorted(KV_METHODS + new)


@pytest.mark.parametrize("method", KV_METHODS)
@pytest.mark.parametrize("cfg,match", [
    (dict(ratio=1.0), r"ratio must be a fraction removed in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio must be"),
    (dict(ratio="0.5"), r"ratio must be"),
    (dict(ratio=0.5, budget_tokens=10), r"ratio and budget_tokens are mutually exclusive"),
    (dict(budgets=0.1, ratio=0.9), r"mutually exclusive"),
    (dict(budget_tokens=0), r"budget_tokens must be in \[1, inf\]"),
    (dict(budgets=0.0), r"budgets must be a fraction kept in \(0, 1\]"),
    (dict(decode_budget=8), r"decode_budget / evict_every need decode-time eviction"),
    (dict(decode="bogus"), r"decode must be one of"),
    (dict(nonsense=1), r"unknown parameter\(s\) \['nonsense'\]"),
])
def test_config_errors(method, cfg, match):
    with pytest.raises(me.ConfigError, match=match):
        me.get_method(method).config_cls.from_kwargs(method, **cfg)


@pytest.mark.parametrize("method,cfg,match", [
    ("snapkv", dict(window=-1), r"window must be in \[0, inf\]"),
    ("snapkv", dict(pooling="median"), r"pooling must be one of"),
    ("snapkv", dict(decode="window"), r"decode must be one of \['none'\]"),
    ("pyramidkv", dict(beta=0.5), r"beta must be in \[1.0, inf\]"),
    ("adakv", dict(alpha=1.5), r"alpha must be in \[0.0, 1.0\]"),
    ("adakv", dict(base="h2o"), r"base must be one of"),
    ("l2norm", dict(skip_layers=5), r"skip_layers must be a tuple"),
    ("lookm", dict(merge="all"), r"merge must be one of"),
    ("vlcache", dict(adaptive_mix=2.0), r"adaptive_mix must be in"),
    ("h2o", dict(decode="window"), r"decode must be one of \['none', 'accumulate'\]"),
    ("streamingllm", dict(n_sink=-1), r"n_sink must be in \[0, inf\]"),
])
def test_method_config_errors(method, cfg, match):
    with pytest.raises(me.ConfigError, match=match):
        me.get_method(method).config_cls.from_kwargs(method, **cfg)


def test_unknown_method_name(llama_text):
    with pytest.raises(me.ConfigError, match="unknown method 'snapk'.*snapkv"):
        me.apply(llama_text, "snapk", ratio=0.5)


def test_one_kv_method_per_model(llama_text):
    with me.apply(llama_text, "snapkv", ratio=0.5):
        with pytest.raises(me.ConfigError, match="already attached"):
            me.apply(llama_text, "h2o", ratio=0.5)


def test_default_ratio_and_describe():
    cfg = me.get_method("snapkv").config_cls()
    assert cfg.removed == 0.5 and cfg.keep(100) == 50
    assert cfg.describe() == "removing 50% of prompt KV (keeping 50%)"
    cfg = me.get_method("snapkv").config_cls(ratio=0.9)
    assert cfg.describe() == "removing 90% of prompt KV (keeping 10%)"


@pytest.mark.parametrize("L,ratio,keep", [(100, 0.9, 10), (10, 0.9, 1), (7, 0.5, 3), (3, 0.99, 1), (64, 0.0, 64)])
def test_keep_rule(L, ratio, keep):
    assert me.get_method("h2o").config_cls(ratio=ratio).keep(L) == keep


def test_budget_conventions(llama_text):
    """budgets (kept fraction, the seed's word) == ratio 1 - budgets; budget_tokens keeps min(L, B)."""
    inputs = dict(input_ids=ids_of(50, 1))
    caches = []
    for cfg in (dict(budgets=0.1), dict(ratio=0.9), dict(budget_tokens=5)):
        with me.apply(llama_text, "snapkv", **cfg):
            caches.append(cache_of(llama_text(**inputs, use_cache=True)))
    assert all_kept(caches[0]) == all_kept(caches[1]) == all_kept(caches[2])
    with me.apply(llama_text, "snapkv", budget_tokens=80):  # >= L: untouched
        out = llama_text(**inputs, use_cache=True)
    assert [cache_of(out).layers[i].keys.shape[-2] for i in range(NL)] == [50] * NL


# ------------------------------------------------------------------------------------------ identity
@pytest.mark.parametrize("method", KV_METHODS)
def test_ratio_zero_is_bit_identical_and_remove_restores(llama_text, method):
    inputs = dict(input_ids=ids_of(40, 2))
    base = llama_text(**inputs).logits
    base_tok, base_logits = gen(llama_text, 4, **inputs)
    with me.apply(llama_text, method, ratio=0.0):
        assert torch.equal(llama_text(**inputs).logits, base)
        tok, logits = gen(llama_text, 4, **inputs)
        assert torch.equal(tok, base_tok) and torch.equal(logits, base_logits)
    h = me.apply(llama_text, method, ratio=0.75)
    out = llama_text(**inputs, use_cache=True)
    assert torch.equal(out.logits, base)  # prefill outputs never change: each layer is compressed after use
    assert cache_of(out).layers[NL - 1].keys.shape[-2] < 40
    h.remove()
    h.remove()
    assert text_model_of(llama_text).config._attn_implementation == "sdpa"
    tok, logits = gen(llama_text, 4, **inputs)
    assert torch.equal(tok, base_tok) and torch.equal(logits, base_logits)


# ------------------------------------------------------------------------------------------ decoding
DECODE_CASES = [("snapkv", dict(window=4)), ("pyramidkv", dict(window=4)), ("adakv", dict(window=4)),
                ("h2o", {}), ("streamingllm", {}), ("l2norm", {}), ("random", dict(window=4)),
                ("vlcache", {}), ("lookm", dict(merge="none"))]


@pytest.mark.parametrize("method,cfg", DECODE_CASES)
@pytest.mark.parametrize("model_name", ["llama_text", "qwen2"])
def test_decode_equals_masked_reference(request, model_name, method, cfg):
    model = request.getfixturevalue(model_name)
    L = 48
    prompt = dict(input_ids=ids_of(L, 3))
    kept, tokens, logits, cache = compressed_decode(model, method, prompt, 4, ratio=0.6, **cfg)
    assert isinstance(cache, TrackedCache) and cache.logical_length == L + 4
    assert all(cache.layers[i].keys.shape[1] == HKV for i in range(NL))  # KV-head storage
    ref = reference_decode(model, prompt, kept, tokens)
    for a, b in zip(logits, ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    everything = [[[list(range(L))] * HKV] for _ in range(NL)]
    full = reference_decode(model, prompt, everything, tokens)
    assert max((a - b).abs().max() for a, b in zip(logits, full)) > 1e-3  # compression changed decoding


def test_decode_eager_backend_with_ragged_heads():
    """AdaKV stores filler slots; eager gets a float per-head mask built from the cache."""
    model = tiny_llama_lm(num_layers=NL, attn_implementation="eager")
    prompt = dict(input_ids=ids_of(48, 4))
    kept, tokens, logits, cache = compressed_decode(model, "adakv", prompt, 3, ratio=0.6, window=4)
    assert any(cache.layers[i].prefix_valid is not None for i in range(NL))  # ragged heads somewhere
    ref = reference_decode(model, prompt, kept, tokens, eager=True)
    for a, b in zip(logits, ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["adakv", "snapkv"])
def test_multi_token_continuation_on_compressed_cache(llama_text, method):
    """A second turn (several new tokens at once) needs a causal mask over per-head slots."""
    L = 40
    prompt = dict(input_ids=ids_of(L, 5))
    turn = ids_of(5, 6)
    with me.apply(llama_text, method, ratio=0.6, window=4):
        cache = cache_of(llama_text(**prompt, use_cache=True))
        kept = all_kept(cache)
        got = llama_text(input_ids=turn, **{CACHE_KW: cache}, use_cache=True).logits
    full = cache_of(llama_text(**prompt, use_cache=True))
    hooks = LayerMasks(llama_text)
    hooks.masks = {i: allowed_mask(kept[i], L + 5, L, 1, False, q=5) for i in range(NL)}
    try:
        ref = llama_text(input_ids=turn, **{CACHE_KW: full}, position_ids=torch.arange(L, L + 5)[None]).logits
    finally:
        hooks.close()
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)


def test_generate_after_compression(llama_text):
    inputs = dict(input_ids=ids_of(40, 7))
    with me.apply(llama_text, "snapkv", ratio=0.6, window=4):
        tok, glog = gen(llama_text, 5, **inputs)
    _, tokens, logits, _ = compressed_decode(llama_text, "snapkv", inputs, 5, ratio=0.6, window=4)
    assert torch.equal(tok, torch.cat(tokens, 1))
    # generate's first logits are the prefill's; the manual loop records each decode step's
    torch.testing.assert_close(glog[:, 1:], torch.stack(logits[:-1], 1), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ decode eviction
def test_streamingllm_window_eviction_50_tokens(llama_text):
    L = 40
    inputs = dict(input_ids=ids_of(L, 8))
    keep = keep_of(L, 0.5)
    with me.apply(llama_text, "streamingllm", ratio=0.5, decode="window") as h:
        out = llama_text.generate(**inputs, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                                  return_dict_in_generate=True)
        cache = getattr(out, "cache", None) or out["past_key_values"]
        assert [cache.layers[i].keys.shape[-2] for i in range(NL)] == [keep] * NL
        assert cache.logical_length == L + 49  # the last generated token is never fed back
        assert kept_positions(cache, 0) == list(range(4)) + list(range(L + 49 - (keep - 4), L + 49))
        assert h.stats.decode_evictions == 49 * NL


def test_streamingllm_window_eviction_equals_reference(llama_text):
    """Each step: the cache holds 4 sinks + the newest tokens, and logits match a masked full-cache run."""
    L, steps = 32, 20
    prompt = dict(input_ids=ids_of(L, 9))
    keep = keep_of(L, 0.5)
    with me.apply(llama_text, "streamingllm", ratio=0.5, decode="window"):
        out = llama_text(**prompt, use_cache=True)
        cache = cache_of(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens, logits = [], []
        for t in range(steps):
            tokens.append(tok)
            o = llama_text(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
            logits.append(o.logits[:, -1])
            tok = o.logits[:, -1].argmax(-1, keepdim=True)
            n = L + t + 1
            assert all(cache.layers[i].keys.shape[-2] == keep for i in range(NL))
            assert kept_positions(cache, NL - 1, 0, 1) == list(range(4)) + list(range(n - keep + 4, n))
    full = cache_of(llama_text(**prompt, use_cache=True))
    hooks = LayerMasks(llama_text)
    try:
        for t, tok in enumerate(tokens):
            S = L + t + 1
            # the new token attends to the kept cache plus itself; eviction follows the attention call
            vis = list(range(4)) + list(range(S - 1 - (keep - 4), S))
            m = torch.zeros(1, H, 1, S, dtype=torch.bool)
            m[..., vis] = True
            hooks.masks = {i: m for i in range(NL)}
            o = llama_text(input_ids=tok, **{CACHE_KW: full}, position_ids=torch.tensor([[L + t]]))
            torch.testing.assert_close(logits[t], o.logits[:, -1], atol=TOL, rtol=0)
    finally:
        hooks.close()


def test_decode_budget_and_evict_every(llama_text):
    L = 40
    inputs = dict(input_ids=ids_of(L, 10))
    with me.apply(llama_text, "streamingllm", ratio=0.5, decode="window", decode_budget=12, evict_every=4):
        out = llama_text(**inputs, use_cache=True)
        cache = cache_of(out)
        assert cache.layers[0].keys.shape[-2] == 20  # prefill keeps keep(L); decoding holds 12 (+ up to 3)
        tok = out.logits[:, -1:].argmax(-1)
        lengths = []
        for _ in range(12):
            o = llama_text(input_ids=tok, **{CACHE_KW: cache}, use_cache=True)
            tok = o.logits[:, -1:].argmax(-1)
            lengths.append(cache.layers[0].keys.shape[-2])
    assert max(lengths[4:]) <= 12 + 3 and lengths[3] == 12 and lengths[7] == 12 and lengths[4] == 13


def test_h2o_accumulate_equals_reference():
    """Decode-time H2O: accumulated attention (prefill column sums + each new row) with eviction of the
    lowest non-recent token; the reference reads the eager model's attention on a masked full cache."""
    model = tiny_llama_lm(num_layers=NL)
    eager = tiny_llama_lm(num_layers=NL, attn_implementation="eager")
    L, ratio, steps = 32, 0.5, 10
    prompt = dict(input_ids=ids_of(L, 11))
    keep = keep_of(L, ratio)
    with me.apply(model, "h2o", ratio=ratio, decode="accumulate"):
        tokens, logits, kept_steps = evicting_decode(model, prompt, steps, keep)
    # reference
    A = eager_attention(eager, **prompt)
    score, kept = [], []
    for i in range(NL):
        s = group_mean(A[i].sum(1))
        score.append({h: {j: float(s[h, j]) for j in range(L)} for h in range(HKV)})
        w = keep // 2
        kept.append([sorted(topk(s[h], keep - w, range(L - w)) + list(range(L - w, L))) for h in range(HKV)])
    full = cache_of(eager(**prompt, use_cache=True))
    hooks = LayerMasks(eager)
    try:
        for t, tok in enumerate(tokens):
            S = L + t + 1
            hooks.masks = {i: allowed_mask([kept[i]], S, L + t, 1, True) for i in range(NL)}
            o = eager(input_ids=tok, **{CACHE_KW: full}, position_ids=torch.tensor([[L + t]]), output_attentions=True)
            torch.testing.assert_close(logits[t], o.logits[:, -1], atol=TOL, rtol=0)
            for i in range(NL):
                row = group_mean(o.attentions[i][0, :, 0].to(torch.float64))  # (Hkv, S)
                for h in range(HKV):
                    kept[i][h].append(L + t)
                    score[i][h][L + t] = 0.0
                    for j in kept[i][h]:
                        score[i][h][j] += float(row[h, j])
                    window = kept[i][h][-(keep // 2):]
                    cands = [j for j in kept[i][h] if j not in window]
                    drop = min(cands, key=lambda j: (score[i][h][j], -j))
                    kept[i][h].remove(drop)
                    assert kept_steps[t][i][0][h] == kept[i][h], (t, i, h)
    finally:
        hooks.close()


# ------------------------------------------------------------------------------------------ batches
BATCH_METHODS = ["snapkv", "pyramidkv", "adakv", "h2o", "streamingllm", "l2norm", "random"]


@pytest.mark.parametrize("method", BATCH_METHODS)
def test_left_padded_batch_equals_single_runs(llama_text, method):
    p1, p2 = ids_of(30, 12), ids_of(40, 13)
    ids, am = pad_left([p1, p2])
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    cfg = dict(ratio=0.6)
    if method in ("snapkv", "pyramidkv", "adakv", "random"):
        cfg["window"] = 4
    with me.apply(llama_text, method, **cfg) as h:
        cache = cache_of(llama_text(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=True))
        batch_kept = all_kept(cache, 2)
        st = h.stats
        assert st.prompt_lengths[NL - 1] == [30, 40]
        tok_b, log_b = gen(llama_text, 3, input_ids=ids, attention_mask=am)
        single_kept = [all_kept(cache_of(llama_text(input_ids=p, use_cache=True))) for p in (p1, p2)]
        single_gen = [gen(llama_text, 3, input_ids=p) for p in (p1, p2)]
    for i in range(NL):
        if method == "l2norm" and i < 2:
            continue  # skipped layers are untouched (padding slots stay, hidden by the 2-D mask)
        for h_ in range(HKV):
            assert [p - 10 for p in batch_kept[i][0][h_]] == single_kept[0][i][0][h_]
            assert batch_kept[i][1][h_] == single_kept[1][i][0][h_]
    for b in range(2):
        tok, logits = single_gen[b]
        assert torch.equal(tok_b[b], tok[0])
        torch.testing.assert_close(log_b[b], logits[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["vlcache", "lookm"])
def test_left_padded_llava_batch_equals_single_runs(llava, method):
    a_ids, a_pv = llava_prompt(num_images=1, seed=0)
    b_ids, b_pv = llava_prompt(num_images=2, seed=1)
    ids, am = pad_left([a_ids, b_ids])
    pv = torch.cat([a_pv, b_pv])
    with me.apply(llava, method, ratio=0.5):
        tok_b, log_b = gen(llava, 3, input_ids=ids, attention_mask=am, pixel_values=pv)
        singles = [gen(llava, 3, input_ids=i, pixel_values=p) for i, p in ((a_ids, a_pv), (b_ids, b_pv))]
    for b in range(2):
        assert torch.equal(tok_b[b], singles[b][0][0])
        torch.testing.assert_close(log_b[b], singles[b][1][0], atol=TOL, rtol=0)


def test_right_padding_raises(llama_text):
    ids = ids_of(10)
    am = torch.ones(1, 10, dtype=torch.long)
    am[0, -2:] = 0
    with me.apply(llama_text, "snapkv", ratio=0.5):
        with pytest.raises(ValueError, match="right padding"):
            llama_text(input_ids=ids, attention_mask=am)


# ------------------------------------------------------------------------------------------ models / composition
@pytest.mark.parametrize("method", ["snapkv", "vlcache", "lookm", "adakv"])
def test_inside_llava_generate(llava, prompt2, method):
    base_tok, _ = gen(llava, 3, **prompt2)
    with me.apply(llava, method, ratio=0.75) as h:
        out = llava(**prompt2, use_cache=True)
        cache = cache_of(out)
        tok, _ = gen(llava, 3, **prompt2)
    assert tok.shape == base_tok.shape
    L = prompt2["input_ids"].shape[1]
    assert all(cache.layers[i].keys.shape[1] == HKV and cache.layers[i].keys.shape[-2] < L for i in range(NL))
    assert h.stats.bytes_after < h.stats.bytes_before and h.stats.prefills >= 1


def test_fastv_then_snapkv(llava_eager, prompt1):
    """The KV ratio applies to what each layer cached: layers < K all 22 tokens, layers >= K the 14 FastV kept.
    Layers >= K keep SnapKV's rule applied to the pruned sequence (FastV's own attention there)."""
    L, window = 22, 2
    with apply_quiet(llava_eager, k=2, ratio=0.5) as fv, me.apply(llava_eager, "snapkv", ratio=0.5, window=window) as kv:
        out = llava_eager(**prompt1, use_cache=True, output_attentions=True)
        cache = cache_of(out)
        assert cache.stored_lengths() == [11, 11, 7, 7]
        assert kv.stats.prompt_lengths == [[22], [22], [14], [14]] and kv.stats.kept == [[11], [11], [7], [7]]
        slots = sorted(set(range(L)) - set(range(3, 19)) | set(fv.stats.kept_visual_positions[0].tolist()))
        for i in range(NL):
            A = out.attentions[i][0].to(torch.float64)
            ref = ref_snapkv(A, keep_of(A.shape[-1], 0.5), window)
            for h in range(HKV):
                expect = ref[h] if i < 2 else [slots[j] for j in ref[h]]
                assert kept_positions(cache, i, 0, h) == expect
        tok, _ = gen(llava_eager, 4, **prompt1)
        assert tok.shape == (1, 4)
    assert text_model_of(llava_eager).config._attn_implementation == "eager"


def test_snapkv_then_fastv_any_order(llava, prompt1):
    base = llava(**prompt1).logits
    kv = me.apply(llava, "snapkv", ratio=0.5, window=2)
    fv = apply_quiet(llava, k=2, ratio=0.5)
    cache = cache_of(llava(**prompt1, use_cache=True))
    assert cache.stored_lengths() == [11, 11, 7, 7]
    kv.remove()
    fv.remove()
    assert torch.equal(llava(**prompt1).logits, base)


# ------------------------------------------------------------------------------------------ cache primitive
def test_tracked_layer_select_per_head():
    layer = TrackedLayer()
    keys = torch.arange(2 * 2 * 6 * 3, dtype=torch.float32).view(2, 2, 6, 3)
    layer.update(keys, keys + 1000)
    layer.score = torch.arange(24, dtype=torch.float32).view(2, 2, 6)
    idx = torch.tensor([[[0, 2, 5], [1, 3, 4]], [[0, 0, 1], [2, 3, 5]]])
    valid = torch.tensor([[[True] * 3, [True] * 3], [[False, True, True], [True] * 3]])
    layer.select(idx, valid)
    assert layer.keys.shape == (2, 2, 3, 3) and layer.get_seq_length() == 3 and layer.logical_length() == 6
    assert torch.equal(layer.keys[1, 1, :, 0], keys[1, 1, [2, 3, 5], 0])
    assert torch.equal(layer.prefix_pos, idx) and torch.equal(layer.prefix_valid, valid)
    assert torch.equal(layer.score[0, 1], torch.tensor([7.0, 9.0, 10.0]))
    layer.update(torch.zeros(2, 2, 1, 3), torch.zeros(2, 2, 1, 3))  # a decode step, shared by all heads
    assert layer.slot_positions().tolist()[0][0] == [0, 2, 5, 6]
    assert layer.slot_valid()[1, 0].tolist() == [False, True, True, True]
    layer.select(torch.tensor([[0, 1, 3], [0, 2, 3]]))  # per-sample index on a per-head layer
    assert layer.prefix_pos[0].tolist() == [[0, 2, 6], [1, 3, 6]] and layer.logical_length() == 7
    assert layer.prefix_valid[1].tolist() == [[False, True, True], [True, True, True]]  # validity kept
    layer.select(torch.tensor([[1, 2], [1, 2]]), True)
    assert layer.prefix_valid is None and layer.prefix_pos[1].tolist() == [[1, 6], [5, 6]]
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.prefix_pos.shape == (1, 2, 2) and layer.keys.shape[0] == 1


# ------------------------------------------------------------------------------------------ Qwen2-VL (M-RoPE)
def reference_generate(model, inputs: dict, kept, n: int):
    """Greedy generate of the unmodified model where, at every decode step, layer i hides the prompt keys
    the method dropped in that layer (generate keeps its own M-RoPE positions)."""
    L = inputs["input_ids"].shape[1]
    tm = text_model_of(model)
    state = {"step": 0}

    def count(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] == 1:
            state["step"] += 1

    def hook(i):
        def fn(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != 1:
                return None
            kwargs["attention_mask"] = allowed_mask(kept[i], L + state["step"], L, 1, False)
            return args, kwargs
        return fn

    handles = [tm.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(tm.layers)]
    try:
        return gen(model, n, **inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method,cfg", [("snapkv", dict(window=4)), ("adakv", dict(window=4)), ("vlcache", {}),
                                        ("lookm", dict(merge="none"))])
def test_qwen2_vl_mrope_generate_equals_masked_reference(method, cfg):
    from mllm_efficiency.testing.tiny import qwen_vl_prompt, tiny_qwen2_vl

    model = tiny_qwen2_vl(num_layers=NL)
    inputs = qwen_vl_prompt(grids=((1, 4, 8),), suffix=(7, 8, 9, 10, 11, 12))
    base_tok, base_logits = gen(model, 4, **inputs)
    with me.apply(model, method, ratio=0.6, **cfg):
        cache = cache_of(model(**inputs, use_cache=True))
        kept = all_kept(cache)
        tok, logits = gen(model, 4, **inputs)
    assert all(cache.layers[i].keys.shape[-2] < inputs["input_ids"].shape[1] for i in range(NL))
    ref_tok, ref_logits = reference_generate(model, inputs, kept, 4)
    assert torch.equal(tok, ref_tok) and tok.shape == base_tok.shape
    torch.testing.assert_close(logits, ref_logits, atol=TOL, rtol=0)
    assert (logits[:, 1:] - base_logits[:, 1:]).abs().max() > 1e-3  # decoding did change


def test_public_kept_positions_helper(llama_text):
    from mllm_efficiency.kv import kept_positions as public

    with me.apply(llama_text, "adakv", ratio=0.6, window=4):
        cache = cache_of(llama_text(input_ids=ids_of(40, 14), use_cache=True))
    assert all(public(cache, i, 0, h) == kept_positions(cache, i, 0, h) for i in range(NL) for h in range(HKV))


def test_fastv_and_snapkv_on_padded_llava_batch_equals_single_runs(llava):
    """FastV leaves filler slots for the shorter sample; the KV budget then applies per sample to real slots."""
    a_ids, a_pv = llava_prompt(num_images=1, seed=0)
    b_ids, b_pv = llava_prompt(num_images=2, seed=1)
    ids, am = pad_left([a_ids, b_ids])
    pv = torch.cat([a_pv, b_pv])
    with apply_quiet(llava, k=1, ratio=0.5), me.apply(llava, "snapkv", ratio=0.5, window=2) as kv:
        tok_b, log_b = gen(llava, 3, input_ids=ids, attention_mask=am, pixel_values=pv)
        assert kv.stats.prompt_lengths == [[22, 40], [14, 24], [14, 24], [14, 24]]
        singles = [gen(llava, 3, input_ids=i, pixel_values=p) for i, p in ((a_ids, a_pv), (b_ids, b_pv))]
    for b in range(2):
        assert torch.equal(tok_b[b], singles[b][0][0])
        torch.testing.assert_close(log_b[b], singles[b][1][0], atol=TOL, rtol=0)


def test_tracked_cache_reset_empties_even_where_base_reset_zero_fills(monkeypatch):
    """transformers 5.17's `DynamicLayer.reset` zero-fills and keeps the length (5.24 drops the tensors); a reset
    TrackedCache must be empty either way, so a pruned prefill can start again on it."""
    from transformers.cache_utils import CacheLayerMixin, DynamicLayer

    def zero_fill(self):
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()

    monkeypatch.setattr(DynamicLayer, "reset", zero_fill)
    monkeypatch.setattr(CacheLayerMixin, "reset", zero_fill)
    cache = TrackedCache(num_layers=2)
    kv = torch.randn(1, 2, 5, 4)
    for i in range(2):
        cache.layers[i].set_pending(torch.tensor([[0, 2, 3, 6, 7]]), None, logical_end=8)
        cache.update(kv, kv, i)
    assert cache.logical_length == 8 and cache.get_seq_length() == 5
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.logical_length == 0
    assert all(not layer.is_tracked for layer in cache.layers)
    cache.layers[0].set_pending(None, None, logical_end=3)
    cache.update(kv[:, :, :3], kv[:, :, :3], 0)  # a pruned prefill starts again on the emptied layer
    assert cache.get_seq_length(0) == 3


def test_tracked_layer_crop_takes_a_length_or_a_removal_count():
    """crop(n >= 0) keeps n logical tokens (transformers 5.17), crop(-n) removes n (5.24); both on every pinned
    version, and never into the pruned prompt."""
    kv = torch.randn(1, 2, 5, 4)
    layer = TrackedLayer()
    layer.set_pending(torch.tensor([[0, 2, 3, 6, 7]]), None, logical_end=8)
    layer.update(kv, kv)
    layer.update(kv[:, :, :3], kv[:, :, :3])  # 3 decoded tokens: logical 11, stored 8
    assert (layer.logical_length(), layer.get_seq_length()) == (11, 8)
    layer.crop(10)
    assert (layer.logical_length(), layer.get_seq_length()) == (10, 7)
    layer.crop(-1)
    assert (layer.logical_length(), layer.get_seq_length()) == (9, 6)
    layer.crop(9)  # nothing to remove
    assert layer.get_seq_length() == 6
    with pytest.raises(NotImplementedError, match="pruned prompt"):
        layer.crop(-2)
