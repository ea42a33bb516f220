"""KV methods inside every VLM wrapper: ratio 0 exact, budgets per layer, decoding on the compressed cache."""
import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.testing.tiny import (anyres_prompt, onevision_video_prompt, qwen_vl_prompt, tiny_llava_next,
                                          tiny_llava_onevision, tiny_qwen2_5_vl)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILIES = {
    "llava_next": (tiny_llava_next, lambda m: anyres_prompt(m, 1)),
    "llava_onevision": (tiny_llava_onevision, lambda m: anyres_prompt(m, 1)),
    "llava_onevision_video": (tiny_llava_onevision, lambda m: onevision_video_prompt(m, 4)),
    "qwen2_5_vl": (tiny_qwen2_5_vl, lambda m: qwen_vl_prompt(((1, 4, 4), (1, 4, 8)))),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    build, prompt = FAMILIES[request.param]
    model = build()
    return model, prompt(model)


def _cache(out):
    return getattr(out, "cache", None) or out.past_key_values


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "vlcache", "lookm"])
@torch.no_grad()
def test_ratio_zero_exact_and_budget(family, method):
    model, inp = family
    base = model(**inp).logits
    with me.apply(model, method, ratio=0.0):
        assert torch.equal(model(**inp).logits, base)
    L = inp["input_ids"].shape[1]
    with me.apply(model, method, ratio=0.5):
        out = model(**inp, use_cache=True)
        assert torch.equal(out.logits, base)  # compression acts after each layer's attention: prefill unchanged
        stored = [layer.keys.shape[-2] for layer in _cache(out).layers]
        if method in ("snapkv", "streamingllm", "lookm"):
            assert stored == [L // 2] * len(stored)
        else:  # layer-adaptive: the mean budget is kept, individual layers differ
            assert max(stored) <= L and sum(stored) <= len(stored) * L
        gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == L + 3
    assert torch.equal(model(**inp).logits, base)


@torch.no_grad()
def test_fastv_then_snapkv(family):
    model, inp = family
    with me.apply(model, "fastv", k=2, ratio=0.5) as fv, me.apply(model, "snapkv", ratio=0.5):
        out = model(**inp, use_cache=True)
        stored = [layer.keys.shape[-2] for layer in _cache(out).layers]
        L = inp["input_ids"].shape[1]
        pruned = fv.stats.pruned_length[0]
        assert stored[:2] == [L // 2] * 2 and stored[2:] == [pruned // 2] * (len(stored) - 2)
        gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == L + 3
