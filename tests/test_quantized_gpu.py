"""bitsandbytes 4-bit / 8-bit models with FastV and KV methods (GPU only: bitsandbytes kernels need CUDA).

A tiny random LLaVA is saved and reloaded through `from_pretrained(..., quantization_config=...)`, the way users
load quantized checkpoints; the methods attach to the quantized model unchanged (they touch attention inputs
and caches, never the quantized Linear weights)."""
import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.testing import llava_prompt, tiny_llava

bnb = pytest.importorskip("bitsandbytes", reason="pip install bitsandbytes (the [quant] extra)")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes needs a CUDA device")

TOKENS = 64  # 64 x 64 px image, 8 px patches
NL = 4


def _cache(out):
    return getattr(out, "cache", None) or out.past_key_values


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava(num_layers=NL, image_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize("bits", [4, 8])
def test_fastv_and_snapkv_on_a_bnb_quantized_llava(checkpoint, bits):
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16) if bits == 4
             else BitsAndBytesConfig(load_in_8bit=True))
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, quantization_config=quant,
                                                          dtype=torch.float16, device_map="cuda:0").eval()
    linear = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, linear)

    ids, pixels = llava_prompt(tokens_per_image=TOKENS, image_size=64)
    inputs = dict(input_ids=ids.cuda(), pixel_values=pixels.cuda().half())
    L = ids.shape[1]
    with torch.no_grad():
        ref = model(**inputs).logits
        with me.apply(model, "fastv", k=2, ratio=0.0):
            assert torch.equal(model(**inputs).logits, ref)  # ratio 0: untouched

        with me.apply(model, "fastv", k=2, ratio=0.5) as h:
            out = model(**inputs, use_cache=True)
            assert h.stats.keep_count == [TOKENS // 2]
            assert [_cache(out).layers[i].keys.shape[-2] for i in range(NL)] == [L, L] + [L - TOKENS // 2] * 2
            gen = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert gen.shape == (1, L + 6)

        with me.apply(model, "snapkv", ratio=0.5, window=4) as h:
            out = model(**inputs, use_cache=True)
            stored = [_cache(out).layers[i].keys.shape[-2] for i in range(NL)]
            assert stored == [L // 2] * NL  # L = 70 is even: ratio 0.5 keeps 35 per layer
            gen = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert gen.shape == (1, L + 6)

        with me.apply(model, "fastv", k=2, ratio=0.5), me.apply(model, "snapkv", ratio=0.5, window=4):
            gen = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert gen.shape == (1, L + 6)
        assert torch.equal(model(**inputs).logits, ref)  # every method removed cleanly
