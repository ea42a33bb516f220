"""`mllm_efficiency.generate` (the fast path) against `model.generate` with the same methods attached.

On CPU the fast path runs its prefill and slot-buffer decode steps eagerly; the CUDA graphs replay exactly
these kernels (the GPU tests at the end capture them). `test_prefill_makes_no_host_sync` emulates a graph
capture on CPU: with the eager run's host values replayed, the prefill of every capturable method must not
read the device from the host.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode

import mllm_efficiency as me
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.fast import release, session_for
from mllm_efficiency.testing import llava_prompt, tiny
from mllm_efficiency.testing.tiny import qwen_vl_prompt

from conftest import pad_left

NEW = 6


def hf_greedy(model, n=NEW, **inputs):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def both(model, n=NEW, **inputs):
    ref = hf_greedy(model, n, **inputs)
    got = me.generate(model, max_new_tokens=n, **inputs)
    return ref, got


@pytest.fixture
def fresh_llava():
    model = tiny.tiny_llava(num_layers=4)
    yield model
    release(model)


@pytest.fixture
def image_prompt():
    ids, pv = llava_prompt(num_images=2, seed=1)
    return dict(input_ids=ids, pixel_values=pv)


METHODS = [
    ("fastv", dict(k=2, ratio=0.75)),
    ("fastv", dict(k=1, ratio=0.5, scorer="all_rows")),
    ("fastv", dict(k=2, ratio=0.5, mode="mask")),
    ("fastv", dict(k=0, ratio=0.5, scorer="random")),
    ("simignore", dict(ratio=0.5)),
    ("snapkv", dict(ratio=0.5, window=4)),
    ("h2o", dict(ratio=0.5)),
    ("streamingllm", dict(ratio=0.5)),
    ("pyramidkv", dict(ratio=0.5, window=4)),
    ("adakv", dict(ratio=0.5, window=4)),
    ("l2norm", dict(ratio=0.5)),
    ("vlcache", dict(ratio=0.5)),
    ("lookm", dict(ratio=0.5)),
    ("random", dict(ratio=0.5)),
    ("divprune", dict(ratio=0.5)),
    ("dart", dict(ratio=0.5, k=2)),
    ("pdrop", dict(ratio=0.5, layer_list=(1, 2))),
    ("sparsevlm", dict(ratio=0.5)),
    ("sparsevlm", dict(sparse_token_list=(12, 6, 3), recycle_ratio=0.5)),
    ("tova", dict(ratio=0.5)),
    ("keydiff", dict(ratio=0.5)),
    ("expected_attention", dict(ratio=0.5)),
    ("random_prune", dict(ratio=0.5)),
    ("visionzip", dict(ratio=0.5)),
    ("prumerge_plus", dict(ratio=0.75)),
    ("visionzip", dict(ratio=0.5, positions="original")),
    ("prumerge_plus", dict(ratio=0.75, positions="original")),
]


@pytest.mark.parametrize("method,cfg", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
def test_same_tokens_as_generate(fresh_llava, image_prompt, method, cfg):
    with me.apply(fresh_llava, method, **cfg):
        ref, got = both(fresh_llava, **image_prompt)
        again = me.generate(fresh_llava, max_new_tokens=NEW, **image_prompt)  # the plan is reused
    assert torch.equal(got, ref)
    assert torch.equal(again, ref)


def test_vanilla_and_ratio_zero_equal_generate(fresh_llava, image_prompt):
    ref, got = both(fresh_llava, **image_prompt)
    assert torch.equal(got, ref)
    with me.apply(fresh_llava, "fastv", k=2, ratio=0.0):
        assert torch.equal(me.generate(fresh_llava, max_new_tokens=NEW, **image_prompt), ref)


def test_method_chain_fastv_snapkv(fresh_llava, image_prompt):
    with me.apply(fresh_llava, "fastv", k=2, ratio=0.5), me.apply(fresh_llava, "snapkv", ratio=0.5, window=4):
        ref, got = both(fresh_llava, **image_prompt)
        lengths = session_for(fresh_llava).last_plan.stored_lengths
    assert torch.equal(got, ref)
    assert lengths[0] > lengths[2]  # layers from K on store the pruned, then compressed, prompt


def _families():
    def next_(m):
        return tiny.anyres_prompt(m, num_images=1)

    def qwen(m):
        return qwen_vl_prompt(grids=((1, 4, 4),))

    def text(m):
        return dict(input_ids=torch.randint(3, 120, (1, 30), generator=torch.Generator().manual_seed(0)))

    return [("llama", tiny.tiny_llama_lm, text), ("qwen2", tiny.tiny_qwen2_lm, text),
            ("llava_next", tiny.tiny_llava_next, next_), ("onevision", tiny.tiny_llava_onevision, next_),
            ("qwen2_vl", tiny.tiny_qwen2_vl, qwen), ("qwen2_5_vl", tiny.tiny_qwen2_5_vl, qwen)]


@pytest.mark.parametrize("name,build,prompt", _families(), ids=[f[0] for f in _families()])
def test_families_vanilla_and_pruned(name, build, prompt):
    model = build(num_layers=4)
    inputs = prompt(model)
    if isinstance(inputs, tuple):
        inputs = dict(zip(("input_ids", "pixel_values", "image_sizes"), inputs))
    try:
        ref, got = both(model, **inputs)
        assert torch.equal(got, ref)
        if name in ("llama", "qwen2"):
            with me.apply(model, "snapkv", ratio=0.5, window=4):
                ref, got = both(model, **inputs)
        else:
            with me.apply(model, "fastv", k=2, ratio=0.75):
                ref, got = both(model, **inputs)
        assert torch.equal(got, ref)
    finally:
        release(model)


def test_left_padded_batch(fresh_llava):
    a, pa = llava_prompt(num_images=1, seed=0, prefix=(1, 10, 11, 12, 13))
    b, pb = llava_prompt(num_images=1, seed=1)
    ids, mask = pad_left([a, b])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pa, pb]))
    for method, cfg in ((None, {}), ("fastv", dict(k=2, ratio=0.75)), ("snapkv", dict(ratio=0.5, window=4))):
        handle = me.apply(fresh_llava, method, **cfg) if method else None
        try:
            ref, got = both(fresh_llava, **inputs)
            assert torch.equal(got, ref), method
            single = me.generate(fresh_llava, max_new_tokens=NEW, input_ids=b, pixel_values=pb)
            assert torch.equal(got[1, -NEW:], single[0, -NEW:]), method
        finally:
            if handle:
                handle.remove()


def test_eos_stops_and_pads_like_generate(fresh_llava, image_prompt):
    ref = hf_greedy(fresh_llava, 8, **image_prompt)
    L = image_prompt["input_ids"].shape[1]
    eos = int(ref[0, L + 2])  # the third new token ends the sequence
    ref_eos = fresh_llava.generate(**image_prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                                   pad_token_id=0)
    got = me.generate(fresh_llava, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, **image_prompt)
    assert torch.equal(got, ref_eos)
    assert got.shape[1] <= L + 3


def test_eos_in_a_batch_pads_the_ended_row(fresh_llava):
    a, pa = llava_prompt(num_images=1, seed=0)
    b, pb = llava_prompt(num_images=1, seed=3)
    inputs = dict(input_ids=torch.cat([a, b]), pixel_values=torch.cat([pa, pb]))
    ref = hf_greedy(fresh_llava, 8, **inputs)
    L = a.shape[1]
    eos = int(ref[0, L + 1])
    ref_eos = fresh_llava.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = me.generate(fresh_llava, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, **inputs)
    assert torch.equal(got, ref_eos)


def test_return_dict_in_generate(fresh_llava, image_prompt):
    out = me.generate(fresh_llava, max_new_tokens=4, return_dict_in_generate=True, **image_prompt)
    assert torch.equal(out.sequences, hf_greedy(fresh_llava, 4, **image_prompt))


def test_stop_strings_stop_the_row(fresh_llava, image_prompt):
    class Tok:  # decodes each token id as its own letter run
        def decode(self, ids, skip_special_tokens=False):
            return "".join(f"<{int(i)}>" for i in ids)

    ref = hf_greedy(fresh_llava, 8, **image_prompt)
    L = image_prompt["input_ids"].shape[1]
    new = ref[0, L:].tolist()
    stop = f"<{new[1]}>"
    end = new.index(new[1]) + 1  # the stop string is complete after the token's first occurrence
    got = me.generate(fresh_llava, max_new_tokens=8, stop_strings=[stop], tokenizer=Tok(), **image_prompt)
    assert got.shape[1] == L + end
    assert torch.equal(got[0], ref[0, :L + end])


def test_sampling_falls_back_with_a_notice(fresh_llava, image_prompt, caplog):
    torch.manual_seed(0)
    ref = fresh_llava.generate(**image_prompt, max_new_tokens=4, do_sample=True, top_k=5)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="mllm_efficiency.fast"):
        got = me.generate(fresh_llava, max_new_tokens=4, do_sample=True, top_k=5, **image_prompt)
    assert torch.equal(got, ref)
    assert "do_sample=True" in caplog.text or not caplog.text  # said once per reason per process
    with pytest.raises(ConfigError, match="do_sample"):
        me.generate(fresh_llava, max_new_tokens=4, do_sample=True, fast=True, **image_prompt)


def test_decode_eviction_and_memory_fall_back(fresh_llava, image_prompt):
    with me.apply(fresh_llava, "h2o", ratio=0.5, decode="accumulate"):
        ref, got = both(fresh_llava, **image_prompt)
        assert torch.equal(got, ref)
        with pytest.raises(ConfigError, match="evicts during decoding"):
            me.generate(fresh_llava, max_new_tokens=4, fast=True, **image_prompt)
    assert session_for(fresh_llava).unsupported_reason() is None


def test_renumbered_positions_after_layer0_fall_back(fresh_llava, image_prompt):
    """FastV positions='renumber' at K > 0 leaves layers < K at the original positions: the slot decoder cannot
    decode that, so auto falls back to model.generate (same tokens) and fast=True says why."""
    with me.apply(fresh_llava, "fastv", k=2, ratio=0.5, positions="renumber"):
        ref, got = both(fresh_llava, **image_prompt)
        assert torch.equal(got, ref)
        with pytest.raises(ConfigError, match="renumber"):
            me.generate(fresh_llava, max_new_tokens=4, fast=True, **image_prompt)


def test_plans_are_reused_per_shape_and_dropped_on_method_change(fresh_llava):
    one = dict(zip(("input_ids", "pixel_values"), llava_prompt(num_images=1, seed=0)))
    two = dict(zip(("input_ids", "pixel_values"), llava_prompt(num_images=2, seed=0)))
    session = session_for(fresh_llava)
    me.generate(fresh_llava, max_new_tokens=3, **one)
    me.generate(fresh_llava, max_new_tokens=3, **dict(one, pixel_values=one["pixel_values"] + 1))
    assert len(session.plans) == 1 and session.last_plan.runs == 2
    me.generate(fresh_llava, max_new_tokens=3, **two)
    assert len(session.plans) == 2
    with me.apply(fresh_llava, "fastv", k=2, ratio=0.5):
        me.generate(fresh_llava, max_new_tokens=3, **one)
        assert len(session.plans) == 1  # the earlier plans were captured without the method
        assert session.last_plan.stored_lengths[2] < session.last_plan.stored_lengths[1]


def test_release_restores_parameters_and_state_dict_releases(fresh_llava, image_prompt):
    before = {k: v.clone() for k, v in fresh_llava.state_dict().items()}
    me.generate(fresh_llava, max_new_tokens=3, **image_prompt)
    q = fresh_llava.model.language_model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().nbytes() > q.numel() * q.element_size()  # a view of the fused q/k/v weight
    state = fresh_llava.state_dict()  # releases the session first
    assert q.untyped_storage().nbytes() == q.numel() * q.element_size()
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_bad_arguments(fresh_llava, image_prompt):
    with pytest.raises(ConfigError, match="fast must be"):
        me.generate(fresh_llava, max_new_tokens=3, fast="yes", **image_prompt)


# --------------------------------------------------------------------------- capture safety on CPU
class _SyncGuard(TorchFunctionMode):
    """Raises on every operation that would read a CUDA tensor from the host (forbidden inside a capture)."""

    SYNCING = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
               "masked_select", "unique", "unique_consecutive", "tensor"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "tensor" and isinstance(args[0], (list, tuple)) and not args[0]:
            return func(*args, **(kwargs or {}))  # an empty tensor copies nothing
        if name in self.SYNCING:
            raise AssertionError(f"host synchronisation inside the captured prefill: {name}")
        if name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                         for a in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            raise AssertionError("boolean-mask indexing inside the captured prefill")
        return func(*args, **(kwargs or {}))


CAPTURABLE = [(None, {}), ("fastv", dict(k=2, ratio=0.75)), ("fastv", dict(k=2, ratio=0.5, mode="mask")),
              ("snapkv", dict(ratio=0.5, window=4)), ("h2o", dict(ratio=0.5)), ("streamingllm", dict(ratio=0.5)),
              ("pyramidkv", dict(ratio=0.5, window=4)), ("l2norm", dict(ratio=0.5)),
              ("simignore", dict(ratio=0.5)), ("simignore", dict(ratio=0.5, action="mask", text_source="prompt")),
              ("simignore", dict(keep=5, text_source="explicit", text_token_ids=(10, 11))),
              ("divprune", dict(ratio=0.5)), ("dart", dict(ratio=0.5, k=2)),
              ("pdrop", dict(ratio=0.5, layer_list=(1, 2))), ("sparsevlm", dict(ratio=0.5)),
              ("tova", dict(ratio=0.5)), ("keydiff", dict(ratio=0.5)),
              ("expected_attention", dict(ratio=0.5)), ("visionzip", dict(ratio=0.5)),
              ("prumerge_plus", dict(ratio=0.75)), ("visionzip", dict(ratio=0.5, positions="original")),
              ("prumerge_plus", dict(ratio=0.75, positions="original"))]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("method,cfg", CAPTURABLE,
                         ids=[f"{m}-original" if c.get("positions") == "original" else str(m) for m, c in CAPTURABLE])
def test_prefill_makes_no_host_sync(fresh_llava, monkeypatch, method, cfg, padded):
    """What a CUDA capture replays: with the eager run's host values handed back, the prefill body must run
    without one host read of a device tensor (emulated on CPU with a guard on every syncing op)."""
    import transformers.masking_utils as mu

    from mllm_efficiency.core import device
    from mllm_efficiency.core.context import ModelContext

    a, pa = llava_prompt(num_images=1, seed=0, prefix=(1, 10, 11, 12, 13))
    b, pb = llava_prompt(num_images=1, seed=1)
    if padded:
        ids, mask = pad_left([a, b])
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pa, pb]))
    else:
        inputs = dict(input_ids=a, pixel_values=pa)
    handle = me.apply(fresh_llava, method, **cfg) if method else None
    try:
        ref = me.generate(fresh_llava, max_new_tokens=3, **inputs)
        plan = session_for(fresh_llava).last_plan
        ctx = ModelContext.of(plan.adapter)
        logits = plan.logits.clone()
        monkeypatch.setattr(device, "_capturing", lambda dev: True)
        monkeypatch.setattr(mu, "is_tracing", lambda *a, **k: True)
        if ctx is not None:
            ctx.host_values.replay(plan.host_values)
        with torch.inference_mode(), _SyncGuard():
            again = plan._prefill_body()
        if ctx is not None:
            ctx.host_values.finish()
        assert torch.allclose(again, logits, atol=1e-5)
        assert ref.shape[1] == inputs["input_ids"].shape[1] + 3
    finally:
        if handle:
            handle.remove()


# --------------------------------------------------------------------------- CUDA graphs (GPU machine only)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("method,cfg", [(None, {})] + METHODS[:3] + METHODS[4:11],
                         ids=["vanilla"] + [f"{m}-{i}" for i, (m, _) in enumerate(METHODS[:3] + METHODS[4:11])])
def test_cuda_graph_paths_equal_generate(method, cfg):
    model = tiny.tiny_llava(num_layers=4).cuda()
    prompts = [dict(input_ids=ids.cuda(), pixel_values=pv.cuda())
               for ids, pv in (llava_prompt(num_images=2, seed=s) for s in range(3))]
    handle = me.apply(model, method, **cfg) if method else None
    try:
        session = session_for(model)
        for p in prompts:  # eager prefill, then capture, then replays of the same shape
            ref = hf_greedy(model, NEW, **p)
            got = me.generate(model, max_new_tokens=NEW, **p)
            assert torch.equal(got, ref)
        plan = session.last_plan
        assert plan.step_graph is not None
        if method in (None, "fastv", "simignore", "snapkv", "h2o", "streamingllm", "pyramidkv"):
            assert plan.prefill_graph is not None, plan.eager_reason
    finally:
        if handle:
            handle.remove()
        release(model)


# --------------------------------------------------------------------------- real weights (slow, CPU, fp32)
@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_real_model_passkey_same_tokens(alias):
    """The fast path gives generate()'s tokens on a real small LLM's 1k-token passkey prompt, alone and with
    SnapKV attached (fp32, CPU; the GGUF models install from the package registry)."""
    from mllm_efficiency.eval.longctx import make_sample
    from mllm_efficiency.zoo import is_installed, load_model

    if not is_installed(alias):
        pytest.skip(f"{alias} is not installed (see docs/models.md)")
    torch.set_num_threads(2)
    model, tok = load_model(alias)
    sample = make_sample("passkey", tok, 1024, 0.5)
    ids = torch.tensor([tok.encode(sample.prompt, add_special_tokens=sample.add_special_tokens)])
    try:
        for method in (None, "snapkv"):
            handle = me.apply(model, method, ratio=0.5) if method else None
            try:
                ref, got = both(model, 12, input_ids=ids)
                assert torch.equal(got, ref), method
            finally:
                if handle:
                    handle.remove()
        answer = tok.decode(got[0, ids.shape[1]:], skip_special_tokens=True)
        assert isinstance(answer, str)
    finally:
        release(model)


VIDEO = [("focus", dict(selected_layers=(0, 1, 2), alpha_list=(0.5, 0.5, 0.5))),
         ("focus", dict(selected_layers=(0, 1), alpha_list=(0.5, 0.25), sic_mode="token_dedup", min_dedup_fraction=0.0)),
         ("framefusion", dict(cost=0.6)), ("framefusion", dict(ratio=0.5)), ("framefusion", dict(cost=0.3)),
         ("cmc", {}), ("cmc", dict(ratio=0.5)), ("adaptiv", {}), ("adaptiv", dict(ratio=0.1))]


@pytest.mark.parametrize("method,cfg", VIDEO, ids=[f"{m}-{i}" for i, (m, _) in enumerate(VIDEO)])
def test_video_methods_same_tokens(ov, ov_prompt, method, cfg):
    """Every video method runs on the fast path (eager prefill: they decide on the host; slot decode steps) and
    gives model.generate's tokens, and the model's own last-position logits from its prefill. (Focus, CMC and
    FrameFusion once fell back: model.generate hid the video's frame grid from their layout, video.layout.)"""
    with me.apply(ov, method, **cfg):
        try:
            with torch.no_grad():
                logits = ov(**ov_prompt, use_cache=True).logits[:, -1]
            ref = hf_greedy(ov, NEW, **ov_prompt)
            got = me.generate(ov, max_new_tokens=NEW, fast=True, **ov_prompt)
            assert torch.equal(got, ref)
            session = session_for(ov)
            assert session.unsupported_reason() is None
            assert session.last_plan.eager_reason is not None  # host-deciding prefill: kept eager, said why
            torch.testing.assert_close(session.last_plan.logits, logits, atol=1e-5, rtol=1e-5)
        finally:
            release(ov)


@pytest.mark.parametrize("method,cfg", [(None, {})] + METHODS, ids=["vanilla"] + [f"{m}-{i}" for i, (m, _) in
                                                                                  enumerate(METHODS)])
def test_fast_prefill_logits_equal_the_models_forward(fresh_llava, image_prompt, method, cfg):
    """The fast prefill (the text model run on the wrapper's embeddings, fused projections) gives the model's own
    last-position logits to fp32 rounding."""
    handle = me.apply(fresh_llava, method, **cfg) if method else None
    try:
        with torch.no_grad():
            ref = fresh_llava(**image_prompt, use_cache=True).logits[:, -1]
        me.generate(fresh_llava, max_new_tokens=1, **image_prompt)
        torch.testing.assert_close(session_for(fresh_llava).last_plan.logits, ref, atol=1e-5, rtol=1e-5)
    finally:
        if handle:
            handle.remove()
