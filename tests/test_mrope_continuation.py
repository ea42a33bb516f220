"""Qwen2-VL: a manual decode loop on a pruned cache continues M-RoPE positions like generate() does."""
import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.testing.tiny import qwen_vl_prompt, tiny_qwen2_vl

from conftest import CACHE_KW

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("k,extra", [(0, dict(scorer="random")), (1, {}), (2, {})])
@torch.no_grad()
def test_manual_loop_equals_generate(k, extra):
    model = tiny_qwen2_vl()
    inp = qwen_vl_prompt(((1, 4, 4), (1, 4, 8)))
    with me.apply(model, "fastv", k=k, ratio=0.5, **extra):
        expected = model.generate(**inp, max_new_tokens=4, do_sample=False)[0, -4:].tolist()
        out = model(**inp, use_cache=True)
        cache = out.past_key_values
        tok, got = out.logits[:, -1:].argmax(-1), []
        for _ in range(4):
            got.append(int(tok))
            tok = model(input_ids=tok, **{CACHE_KW: cache}, use_cache=True).logits[:, -1:].argmax(-1)
        lengths = [layer.get_seq_length() for layer in cache.layers]
    assert got == expected
    L = inp["input_ids"].shape[1]
    assert lengths[:k] == [L + 4] * k and lengths[k:] == [L + 4 - 6] * (4 - k)  # 12 image tokens, 6 dropped
