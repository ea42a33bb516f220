"""FastDecoder (static slot buffers, CUDA-graph step on GPU) against transformers' own generate().

generate() on the same model with the same methods attached is the reference: the fast decoder is fed the
tokens generate() chose (teacher forcing) and its logits must match generate()'s at every step. On CPU the
step runs eagerly; the CUDA graph replays exactly these kernels.
"""
from __future__ import annotations

import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.fast import FastDecoder
from mllm_efficiency.testing import llava_prompt
from mllm_efficiency.testing.tiny import qwen_vl_prompt, tiny_qwen2_vl

from conftest import pad_left

STEPS = 6


def reference(model, **inputs):
    L = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, L:], torch.stack(out.logits, dim=1)  # (B, n), (B, n, V)


def fast_logits(model, tokens, **inputs):
    dec = FastDecoder(model, max_new_tokens=STEPS)
    steps = [dec.prefill(**inputs)]
    for t in range(STEPS - 1):
        steps.append(dec.step(tokens[:, t:t + 1]))
    lengths = dec.stored_lengths
    dec.close()
    return torch.stack(steps, dim=1), lengths


def assert_matches_generate(model, **inputs):
    tokens, ref = reference(model, **inputs)
    got, lengths = fast_logits(model, tokens, **inputs)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    return lengths


def text_ids(length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (1, length), generator=g)


def test_unmodified_model(llama_text):
    lengths = assert_matches_generate(llama_text, input_ids=text_ids(40))
    assert lengths == [40] * 4


@pytest.mark.parametrize("method,cfg", [("snapkv", dict(ratio=0.5, window=4)), ("adakv", dict(ratio=0.5, window=4)),
                                        ("pyramidkv", dict(ratio=0.5, window=4)), ("streamingllm", dict(ratio=0.5)),
                                        ("h2o", dict(ratio=0.5))])
def test_compressed_caches(qwen2, method, cfg):
    with me.apply(qwen2, method, **cfg):
        lengths = assert_matches_generate(qwen2, input_ids=text_ids(48, seed=1))
    assert max(lengths) < 48


def test_fastv_on_llava(llava, prompt2, attach):
    attach(llava, k=2, ratio=0.5)
    lengths = assert_matches_generate(llava, **prompt2)
    n = 32  # two images of 16 tokens
    assert lengths[:2] == [40, 40] and lengths[2:] == [40 - n // 2] * 2


def test_fastv_and_snapkv_composed(llava, prompt3, attach):
    attach(llava, k=1, ratio=0.75)
    with me.apply(llava, "snapkv", ratio=0.5, window=4):
        lengths = assert_matches_generate(llava, **prompt3)
    assert lengths[0] < 58 and lengths[1] < lengths[0]


@pytest.mark.parametrize("method", [None, "snapkv", "adakv"])
def test_left_padded_batch(llama_text, method):
    ids, mask = pad_left([text_ids(30, seed=2), text_ids(44, seed=3)])
    if method is None:
        assert_matches_generate(llama_text, input_ids=ids, attention_mask=mask)
    else:
        with me.apply(llama_text, method, ratio=0.5, window=4):
            assert_matches_generate(llama_text, input_ids=ids, attention_mask=mask)


def test_left_padded_llava_with_fastv(llava, attach):
    a, pa = llava_prompt(num_images=1, seed=4)
    b, pb = llava_prompt(num_images=1, seed=5, prefix=(1, 10, 11, 15, 16, 17))
    ids, mask = pad_left([a, b])
    attach(llava, k=2, ratio=0.5)
    assert_matches_generate(llava, input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pa, pb]))


def test_mrope_model_with_snapkv():
    model = tiny_qwen2_vl()
    inputs = qwen_vl_prompt(grids=((1, 4, 8),))
    assert_matches_generate(model, **inputs)
    with me.apply(model, "snapkv", ratio=0.5, window=4):
        lengths = assert_matches_generate(model, **inputs)
    assert max(lengths) < inputs["input_ids"].shape[1]


def test_generate_equals_hf_generate(llama_text):
    ids = text_ids(24, seed=6)
    hf = llama_text.generate(input_ids=ids, max_new_tokens=STEPS, do_sample=False)[:, 24:]  # stops at EOS
    dec = FastDecoder(llama_text, max_new_tokens=STEPS)
    assert torch.equal(dec.generate(input_ids=ids)[:, :hf.shape[1]], hf)
    assert dec.kv_bytes == 4 * 24 * 2 * 2 * 16 * 4  # layers * slots * (K,V) * kv heads * head dim * fp32 bytes


def test_prefill_again_resets(llama_text):
    dec = FastDecoder(llama_text, max_new_tokens=3)
    a = dec.generate(input_ids=text_ids(20, seed=7))
    dec.generate(input_ids=text_ids(33, seed=8))
    assert torch.equal(dec.generate(input_ids=text_ids(20, seed=7)), a)


def test_errors(llama_text, llava, attach):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        FastDecoder(llama_text, max_new_tokens=0)
    dec = FastDecoder(llama_text, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="prefill"):
        dec.step(torch.zeros(1, 1, dtype=torch.long))
    logits = dec.prefill(input_ids=text_ids(10))
    dec.step(logits.argmax(-1, keepdim=True))
    dec.step(logits.argmax(-1, keepdim=True))
    with pytest.raises(RuntimeError, match="max_new_tokens=2"):
        dec.step(logits.argmax(-1, keepdim=True))
    dec.prefill(input_ids=text_ids(10))
    with pytest.raises(ValueError, match="shape"):
        dec.step(torch.zeros(2, 1, dtype=torch.long))
    with me.apply(llama_text, "h2o", ratio=0.5, decode="accumulate"):
        with pytest.raises(NotImplementedError, match="decode='accumulate'"):
            FastDecoder(llama_text, max_new_tokens=2).prefill(input_ids=text_ids(10))
    ids, mask = pad_left([text_ids(8), text_ids(10)])
    right = torch.cat([mask[:, 2:], mask[:, :2]], dim=1)
    with pytest.raises(ValueError, match="right padding"):
        FastDecoder(llama_text, max_new_tokens=2).prefill(input_ids=ids, attention_mask=right)
    with pytest.raises(NotImplementedError, match="LM head"):
        FastDecoder(llama_text.model, max_new_tokens=2)


def test_renumbered_positions_refused(llava, prompt1, attach):
    attach(llava, k=2, ratio=0.5, positions="renumber")
    with pytest.raises(NotImplementedError, match="renumber"):
        FastDecoder(llava, max_new_tokens=2).prefill(**prompt1)


def test_model_unchanged_after_decoding(llama_text):
    ids = text_ids(16, seed=9)
    before = llama_text(ids).logits
    FastDecoder(llama_text, max_new_tokens=3).generate(input_ids=ids)
    assert llama_text.config._attn_implementation == "sdpa"
    assert torch.equal(llama_text(ids).logits, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", [None, "snapkv", "adakv"])
def test_cuda_graph_replay_matches_generate(method):
    from mllm_efficiency.testing import tiny_llama_lm

    model = tiny_llama_lm(num_layers=4).cuda()
    ids, mask = pad_left([text_ids(30, seed=2), text_ids(44, seed=3)])
    inputs = dict(input_ids=ids.cuda(), attention_mask=mask.cuda())
    handle = me.apply(model, method, ratio=0.5, window=4) if method else None
    try:
        tokens, ref = reference(model, **inputs)
        dec = FastDecoder(model, max_new_tokens=STEPS)
        got = [dec.prefill(**inputs)]
        assert dec._graph is not None
        for t in range(STEPS - 1):
            got.append(dec.step(tokens[:, t:t + 1]))
        torch.testing.assert_close(torch.stack(got, dim=1), ref, atol=1e-4, rtol=1e-3)
    finally:
        if handle is not None:
            handle.remove()


def test_fused_projections_match_unfused_and_unfuse_on_close(llama_text):
    ids = text_ids(20, seed=4)
    params = dict(llama_text.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    with me.apply(llama_text, "snapkv", ratio=0.5, window=4):
        plain = FastDecoder(llama_text, max_new_tokens=STEPS, fuse_projections=False)
        fused = FastDecoder(llama_text, max_new_tokens=STEPS)
        logits = [plain.prefill(input_ids=ids)], [fused.prefill(input_ids=ids)]
        tokens = logits[0][0].argmax(-1, keepdim=True)
        for _ in range(STEPS - 1):
            logits[0].append(plain.step(tokens))
            logits[1].append(fused.step(tokens))
            tokens = logits[0][-1].argmax(-1, keepdim=True)
        torch.testing.assert_close(torch.stack(logits[1]), torch.stack(logits[0]), atol=1e-5, rtol=1e-5)

        groups = fused._fusion.groups
        assert len(groups) == 2 * llama_text.config.num_hidden_layers  # q/k/v and gate/up of every layer
        attn = llama_text.model.layers[0].self_attn
        storage = attn.q_proj.weight.untyped_storage().data_ptr()
        assert attn.k_proj.weight.untyped_storage().data_ptr() == storage  # views of one fused matrix
        assert "forward" not in vars(attn.q_proj)  # the fused forward exists only inside a step
        fused.close()
        plain.close()
    assert attn.k_proj.weight.untyped_storage().data_ptr() != attn.q_proj.weight.untyped_storage().data_ptr()
    for n, p in llama_text.named_parameters():
        assert torch.equal(p, before[n]) and not p.is_inference(), n
