"""Block memory (Q-LLM / InfLLM / StreamingLLM / LM-Infinite) on tiny random models: exactness, the algorithm
against a dense reference, retrieval, block formation, cache policies, questions, state handling."""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import mllm_efficiency as me
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.memory import GreedySearch, patch_hf
from mllm_efficiency.memory.blocks import BlockCache, BlockStore
from mllm_efficiency.memory.config import InfLLMConfig, QLLMConfig
from mllm_efficiency.memory.rope import RopeTable
from mllm_efficiency.memory.search import locate_question
from mllm_efficiency.memory.unit import MemoryUnit
from mllm_efficiency.testing import tiny_llama_lm, tiny_qwen2_lm

METHODS = ["qllm", "infllm", "streamingllm_memory", "lm_infinite"]
SMALL = dict(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16, max_cached_block=4, repr_topk=2)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama_lm()


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_lm()


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (1, n), generator=g)


def _kw(method, **over):
    kw = dict(SMALL, **over)
    if method == "qllm":
        kw.setdefault("on_missing_question", "infllm")
    return kw


# ------------------------------------------------------------------ exactness inside the window
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_window_larger_than_prompt_equals_model(method, family, llama, qwen):
    model = llama if family == "llama" else qwen
    ids = _ids(40)
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    with me.apply(model, method, **_kw(method, n_local=64, exc_block_size=16)):
        with torch.no_grad():
            out = model(ids).logits
            gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(gen, ref_gen)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # removed: stock behaviour
    assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------ the algorithm against a dense reference
def _capped_reference(model, n_local):
    """Causal attention where every key further than n_local - 1 sits at distance n_local - 1: what InfLLM
    computes when every block is retrieved (sinks, blocks and remainder at the fixed distance)."""
    text = model.model
    rot = text.rotary_emb
    captured = {}

    def rotate_half(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), -1)

    def attn(module, query, key, value, attention_mask, scaling=None, **kw):
        B, L = captured[module.layer_idx]["q"].shape[:2]
        H, D = module.config.num_attention_heads, module.head_dim
        Hkv = module.config.num_key_value_heads
        q = captured[module.layer_idx]["q"][0].view(L, H, D).transpose(0, 1)
        k = captured[module.layer_idx]["k"][0].view(L, Hkv, D).transpose(0, 1).repeat_interleave(H // Hkv, 0)
        v = value[0].repeat_interleave(H // Hkv, 0)
        cos, sin = rot(q, torch.arange(n_local)[None])
        rq = q[:, None] * cos[0][None, :, None] + rotate_half(q)[:, None] * sin[0][None, :, None]  # (H, d, L, D)
        logits = torch.einsum("hpld,hjd->hplj", rq, k)
        i = torch.arange(L)[:, None]
        j = torch.arange(L)[None, :]
        dist = (i - j).clamp(0, n_local - 1)
        logits = logits.gather(1, dist[None, None].expand(H, 1, L, L)).squeeze(1) * scaling
        logits = logits.masked_fill(j > i, float("-inf"))
        out = torch.softmax(logits.float(), -1) @ v
        return out.transpose(0, 1).unsqueeze(0), None

    AttentionInterface.register("test_memory_capped", attn)
    handles = []
    for layer in text.layers:
        m = layer.self_attn
        handles.append(m.q_proj.register_forward_hook(
            lambda mod, a, o, i=m.layer_idx: captured.setdefault(i, {}).__setitem__("q", o)))
        handles.append(m.k_proj.register_forward_hook(
            lambda mod, a, o, i=m.layer_idx: captured.setdefault(i, {}).__setitem__("k", o)))
    return handles


@pytest.mark.parametrize("chunk,exc", [(200, 16), (48, 8), (7, 4)])
def test_infllm_all_blocks_retrieved_equals_dense_capped_reference(llama, chunk, exc):
    ids = _ids(200, seed=1)
    n_local = 32
    handles = _capped_reference(llama, n_local)
    try:
        llama.config._attn_implementation = "test_memory_capped"
        with torch.no_grad():
            ref = llama(ids).logits[0, -1]
    finally:
        llama.config._attn_implementation = "sdpa"
        for h in handles:
            h.remove()
    kw = dict(SMALL, n_local=n_local, exc_block_size=exc, topk=32, max_cached_block=32)
    with me.apply(llama, "infllm", **kw) as h:
        gs = GreedySearch(llama)
        gs.cache = gs.engine.new_cache()
        embeds = llama.model.embed_tokens(ids)
        with torch.no_grad():
            outs = [gs._forward(embeds[:, s:s + chunk], s) for s in range(0, 200, chunk)]
        assert h.stats["blocks"] > 0 and h.stats["sinks"] == 4
    torch.testing.assert_close(outs[-1][0, -1], ref, atol=1e-4, rtol=1e-4)


def test_streaming_differs_from_infllm_beyond_window(llama):
    ids = _ids(200, seed=2)
    outs = {}
    for method in ("infllm", "streamingllm_memory", "lm_infinite"):
        with me.apply(llama, method, **SMALL):
            with torch.no_grad():
                outs[method] = llama(ids).logits[0, -1]
    assert not torch.allclose(outs["infllm"], outs["streamingllm_memory"])
    assert not torch.allclose(outs["streamingllm_memory"], outs["lm_infinite"])


# ------------------------------------------------------------------ units: blocks, representatives, retrieval
def _unit(cfg, H=4, Hkv=2, D=16, **kw):
    rope = RopeTable(tiny_llama_lm(num_layers=1).model.rotary_emb, D, cfg.n_local + cfg.exc_block_size + cfg.n_init + 1)
    return MemoryUnit(cfg, rope, H, Hkv, D, "cpu", torch.float32, **kw)


@pytest.mark.parametrize("n", [50, 123, 300])
def test_block_formation_counts(n):
    cfg = InfLLMConfig(**SMALL)
    u = _unit(cfg)
    g = torch.Generator().manual_seed(n)
    for s in range(0, n, 37):  # several calls of uneven size
        L = min(37, n - s)
        u.process(torch.randn(4, L, 16, generator=g), torch.randn(2, L, 16, generator=g),
                  torch.randn(2, L, 16, generator=g), 0.25)
    expected_sinks = min(cfg.n_init, max(n - cfg.n_local, 0))
    expected_blocks = max(0, (n - expected_sinks - cfg.n_local) // cfg.block_size)
    assert u.init_k.shape[1] == expected_sinks
    assert len(u.store) == expected_blocks
    assert u.seen == n and u.rem_pos0 == expected_sinks + expected_blocks * cfg.block_size


def test_representative_is_mean_of_top_scored_keys():
    cfg = InfLLMConfig(**dict(SMALL, repr_topk=3))
    u = _unit(cfg)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 8, 16, generator=g)
    score = torch.rand(4, 8, generator=g)
    rep = u._representative(keys, score).view(4, 16)
    for h in range(4):
        top = score[h].argsort(descending=True)[:3]
        torch.testing.assert_close(rep[h], keys[h // 2, top].mean(0))


def test_retrieval_picks_the_block_holding_a_planted_key():
    cfg = InfLLMConfig(**dict(SMALL, topk=1))
    u = _unit(cfg)
    g = torch.Generator().manual_seed(3)
    n = 200
    k = torch.randn(2, n, 16, generator=g) * 0.1
    direction = torch.randn(16, generator=g)
    k[:, 60:68] += 5 * direction  # block 7 once sinks (4) are out: tokens 60..67 -> block (60 - 4) // 8 = 7
    u.process(torch.randn(4, n, 16, generator=g) * 0.1, k, torch.randn(2, n, 16, generator=g), 0.25)
    gq = direction.expand(4, 1, 16).clone()  # the global query itself points at the planted keys
    chosen = u._retrieve(gq)
    assert chosen == [7]


def test_question_term_steers_retrieval():
    cfg = QLLMConfig(**dict(SMALL, topk=1, question_weight=100.0))
    u = _unit(cfg)
    g = torch.Generator().manual_seed(4)
    n = 200
    k = torch.randn(2, n, 16, generator=g)
    u.process(torch.randn(4, n, 16, generator=g), k, torch.randn(2, n, 16, generator=g), 0.25)
    # a question aligned with block 3's representative wins against any current query
    u.set_question(u.reps.value[3] * 10)
    chosen = u._retrieve(torch.randn(4, 1, 16, generator=g))
    assert chosen == [3]


def test_qllm_weight_zero_equals_infllm(llama):
    ids = _ids(200, seed=5)
    with me.apply(llama, "infllm", **SMALL):
        gs = GreedySearch(llama)
        gs.generate(input_ids=ids, max_new_tokens=3, chunk_size=64)
        ref = gs.last_stats["new_token_ids"]
    with me.apply(llama, "qllm", **dict(SMALL, question_weight=0.0)):
        gs = GreedySearch(llama)
        gs.generate(input_ids=ids, max_new_tokens=3, chunk_size=64, question_span=(0, 8))
        assert gs.last_stats["question_source"] == "span"
        assert gs.last_stats["memory"]["question"] == "span"
        assert gs.last_stats["new_token_ids"] == ref


# ------------------------------------------------------------------ block cache and offload
class _FakeStore:
    def __init__(self):
        self.fetched = []

    def fetch(self, ids, device):
        self.fetched.append(list(ids))
        return torch.stack([torch.full((2, 1, 1, 1), float(b)) for b in ids])


def test_lru_evicts_least_recently_selected():
    c, s = BlockCache(3, "lru", 0.1), _FakeStore()
    for step in ([0, 1], [2], [0], [3], [4]):
        c.select(step, s, "cpu")
    # after [0,1],[2],[0]: stamps 0->3, 1->1, 2->2; [3] evicts 1; [4] evicts 2
    assert c.evicted == [1, 2]
    assert c.resident() == [0, 3, 4]
    slots = c.select([0, 4], s, "cpu")
    assert c.slots[slots, 0].flatten().tolist() == [0.0, 4.0]


def test_fifo_evicts_earliest_resident():
    c, s = BlockCache(3, "fifo", 0.1), _FakeStore()
    for step in ([0, 1], [2], [0], [3], [4]):
        c.select(step, s, "cpu")
    assert c.evicted == [0, 1]  # re-selecting 0 does not refresh it
    assert c.resident() == [2, 3, 4]


def test_lru_s_evicts_lowest_decayed_score_and_never_the_chosen():
    c, s = BlockCache(3, "lru-s", 0.5), _FakeStore()
    c.select([0, 1, 2], s, "cpu")
    c.add_mass([0, 1, 2], [1.0, 4.0, 2.0])  # scores 1, 4, 2
    c.select([0], s, "cpu")
    c.add_mass([0], [0.1])  # 0.6, 2, 1
    c.select([3], s, "cpu")  # evicts 0 (lowest)
    assert c.evicted == [0]
    c.add_mass([3], [0.0])  # 1: 1.0, 2: 0.5, 3: 0.0
    c.select([3, 5], s, "cpu")  # 3 is chosen (score 0, lowest) -> must evict 2 instead
    assert c.evicted == [0, 2]
    assert c.resident() == [1, 3, 5]


def test_cpu_offload_round_trip_is_exact():
    store = BlockStore((2, 8, 16), torch.float32, "cpu", pin=False)
    blocks = [(torch.randn(2, 8, 16), torch.randn(2, 8, 16)) for _ in range(7)]  # forces two regrowths
    for k, v in blocks:
        store.add(k, v)
    got = store.fetch([5, 0, 6], "cpu")
    for row, b in zip(got, [5, 0, 6]):
        assert torch.equal(row[0], blocks[b][0]) and torch.equal(row[1], blocks[b][1])


def test_offload_gpu_and_cpu_give_same_tokens_and_policies_run(llama):
    ids = _ids(220, seed=6)
    outs = []
    for extra in (dict(offload="cpu"), dict(offload="gpu"), dict(cache_strategy="lru-s"),
                  dict(cache_strategy="fifo"), dict(chunk_topk_calc=32)):
        with me.apply(llama, "infllm", **dict(SMALL, **extra)) as h:
            gs = GreedySearch(llama)
            gs.generate(input_ids=ids, max_new_tokens=3, chunk_size=64)
            outs.append(gs.last_stats["new_token_ids"])
            assert h.stats["retrievals"] > 0
    assert outs[0] == outs[1]  # where blocks live does not change the result


# ------------------------------------------------------------------ questions
def test_locate_question_exact_and_bpe_widened():
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    assert locate_question(prompt, [8, 9, 10]) == (3, 6)
    # boundary tokens differ (BPE merges): search the interior and widen by one on each side
    assert locate_question(prompt, [99, 9, 10, 98]) == (3, 7)
    assert locate_question(prompt, [1, 2, 3]) is None
    assert locate_question(prompt, [99, 98]) is None


def test_question_by_span_text_probe_and_missing(llama):
    ids = _ids(200, seed=7)

    class Tok:
        eos_token_id = None

        def __call__(self, text, add_special_tokens=True, return_tensors=None):
            return {"input_ids": [int(t) for t in text.split()]}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    q_text = " ".join(str(t) for t in ids[0, 10:16].tolist())
    with me.apply(llama, "qllm", **SMALL):
        gs = GreedySearch(llama, Tok())
        gs.generate(input_ids=ids, question_span=(10, 16), max_new_tokens=2, chunk_size=64)
        by_span = gs.last_stats["new_token_ids"]
        assert gs.last_stats["question_source"] == "span"
        gs.generate(input_ids=ids, question=q_text, max_new_tokens=2, chunk_size=64, reset=True)
        assert gs.last_stats["question_source"] == "span"
        assert gs.last_stats["new_token_ids"] == by_span
        gs.generate(input_ids=ids, question="121 122 123", max_new_tokens=2, chunk_size=64, reset=True)
        assert gs.last_stats["question_source"] == "probe" and gs.last_stats["memory"]["question"] == "probe"
        with pytest.raises(ValueError, match="question"):
            gs.generate(input_ids=ids, max_new_tokens=2, reset=True)
        with pytest.raises(ValueError, match="question"):
            llama(ids)  # plain forward without a question
    with me.apply(llama, "qllm", **dict(SMALL, on_missing_question="infllm")):
        gs = GreedySearch(llama)
        gs.generate(input_ids=ids, max_new_tokens=2, chunk_size=64)
        assert gs.last_stats["question_source"] == "none"


# ------------------------------------------------------------------ state: clear, multi-turn, batches
def test_clear_resets_and_multi_turn_equals_single_shot(llama):
    a, b = _ids(120, seed=8), _ids(90, seed=9)
    # every block retrieved: the result does not depend on how calls split the tokens (see the reference test)
    with me.apply(llama, "infllm", **dict(SMALL, topk=32, max_cached_block=32)) as h:
        gs = GreedySearch(llama)
        gs.generate(input_ids=a, max_new_tokens=3, chunk_size=50)
        gen_a = gs.last_stats["new_token_ids"]
        gs.generate(input_ids=b, max_new_tokens=3, chunk_size=50)  # continues the memory
        multi = gs.last_stats["new_token_ids"]
        assert h.stats["tokens"] == 120 + 3 + 90 + 2
        gs.clear()
        assert gs.cache is None
        gs.generate(input_ids=torch.cat([a, torch.tensor([gen_a]), b], 1), max_new_tokens=3, chunk_size=50)
        assert gs.last_stats["new_token_ids"] == multi
        fresh = GreedySearch(llama)
        fresh.generate(input_ids=b, max_new_tokens=3, chunk_size=50)
        gs.clear()
        gs.generate(input_ids=b, max_new_tokens=3, chunk_size=50)
        assert gs.last_stats["new_token_ids"] == fresh.last_stats["new_token_ids"]


def test_batch_of_two_prompts_equals_two_single_runs_and_batched_forward_raises(llama):
    a, b = _ids(150, seed=10), _ids(100, seed=11)
    with me.apply(llama, "infllm", **SMALL):
        gs = GreedySearch(llama)
        singles = []
        for x in (a, b):
            gs.generate(input_ids=x, max_new_tokens=3, chunk_size=64, reset=True)
            singles.append(gs.last_stats["new_token_ids"])
        pad = torch.zeros(1, 50, dtype=torch.long)
        batch = torch.cat([a, torch.cat([pad, b], 1)])
        mask = torch.cat([torch.ones(1, 150), torch.cat([torch.zeros(1, 50), torch.ones(1, 100)], 1)]).long()
        gs.generate(input_ids=batch, attention_mask=mask, max_new_tokens=3, chunk_size=64)
        assert [s["new_token_ids"] for s in gs.all_stats] == singles
        with pytest.raises(NotImplementedError, match="batch size 2"):
            llama(torch.cat([a[:, :20], b[:, :20]]))
        with pytest.raises(NotImplementedError, match="padded"):
            llama(batch[1:], attention_mask=mask[1:])


# ------------------------------------------------------------------ API surface
def test_patch_hf_names_and_config_errors(llama):
    patch_hf(llama, "stream-llm", dict(SMALL, type="stream-llm", path=None, fattn=False))
    assert llama.memory_handle.name == "streamingllm_memory"
    patch_hf(llama, "inf-llm", SMALL)  # replaces the previous handle
    assert llama.memory_handle.name == "infllm"
    patch_hf(llama, "origin", {})
    assert llama.memory_handle is None and llama.config._attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="type must be one of"):
        patch_hf(llama, "nope", {})
    with pytest.raises(ConfigError, match="exc_block_size"):
        me.apply(llama, "infllm", n_local=64, exc_block_size=128)
    with pytest.raises(ConfigError, match="max_cached_block"):
        me.apply(llama, "infllm", topk=8, max_cached_block=4)
    with pytest.raises(ConfigError, match="repr_topk"):
        me.apply(llama, "qllm", block_size=8, repr_topk=9)
    with pytest.raises(ConfigError, match="cache_strategy"):
        me.apply(llama, "infllm", cache_strategy="random")
    with pytest.raises(ConfigError, match="unknown parameter"):
        me.apply(llama, "infllm", window=3)
    assert llama.config._attn_implementation == "sdpa"


def test_memory_refuses_to_compose_with_kv_compression(llama):
    with me.apply(llama, "snapkv", ratio=0.5):
        with pytest.raises(ConfigError, match="does not compose"):
            me.apply(llama, "infllm", **SMALL)
    with me.apply(llama, "infllm", **SMALL):
        with pytest.raises(ConfigError, match="already attached"):
            me.apply(llama, "qllm", **SMALL)


def test_greedy_search_rejects_sampling_and_bad_arguments(llama):
    gs = GreedySearch(llama)
    ids = _ids(10)
    with pytest.raises(ConfigError, match="do_sample"):
        gs.generate(input_ids=ids, do_sample=True)
    with pytest.raises(ConfigError, match="exactly one"):
        gs.generate(input_ids=ids, inputs_embeds=torch.zeros(1, 2, 64))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        gs.generate(input_ids=ids, max_new_tokens=-1)
    with pytest.warns(DeprecationWarning, match="max_length"):
        gs.generate(input_ids=ids, max_length=2)
    assert gs.last_stats["tokens_generated"] <= 2


def test_llava_next_images_in_the_context():
    from mllm_efficiency.testing.tiny import anyres_prompt, tiny_llava_next

    model = tiny_llava_next()
    inputs = anyres_prompt(model)
    n = inputs["input_ids"].shape[1]
    ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, n:].tolist()
    with me.apply(model, "infllm", **dict(SMALL, n_local=128, exc_block_size=32)):
        gs = GreedySearch(model)
        gs.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    image_sizes=inputs["image_sizes"], max_new_tokens=3, chunk_size=40)
        assert gs.last_stats["new_token_ids"] == ref
    with me.apply(model, "qllm", **SMALL):  # window smaller than the image: blocks hold image features
        gs = GreedySearch(model)
        gs.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                    image_sizes=inputs["image_sizes"], question_span=(n - 3, n), max_new_tokens=3, chunk_size=40)
        assert gs.last_stats["memory"]["blocks"] > 0


def test_mrope_models_are_refused():
    from mllm_efficiency.testing.tiny import tiny_qwen2_vl

    with pytest.raises(NotImplementedError, match="M-RoPE"):
        me.apply(tiny_qwen2_vl(num_layers=1), "infllm")
