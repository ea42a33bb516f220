"""The causal-LM rows of the README support table: Mistral (FastV with a given span, a KV method) and
SimIgnore on a text LLM whose config names an image token id."""
import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.testing.tiny import IMAGE_TOKEN, _text_config, tiny_qwen2_lm

from conftest import CACHE_KW, cache_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**_text_config(4), sliding_window=None,
                                            attn_implementation="sdpa")).eval()


@torch.no_grad()
def test_mistral_fastv_with_span(mistral):
    ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(1))
    span = dict(image_token_start_index=5, image_token_length=16)
    base = mistral(ids).logits
    with me.apply(mistral, "fastv", k=2, ratio=0.0, **span):
        assert torch.equal(mistral(ids).logits, base)
    with me.apply(mistral, "fastv", k=2, ratio=0.75, **span) as h:
        out = mistral(ids, use_cache=True)
        assert h.stats.keep_count == [4]
        assert [layer.keys.shape[-2] for layer in cache_of(out).layers] == [30, 30, 18, 18]
        tok = out.logits[:, -1:].argmax(-1)
        nxt = mistral(input_ids=tok, **{CACHE_KW: cache_of(out)}, use_cache=True)
        assert nxt.logits.shape == (1, 1, 128)
    assert torch.equal(mistral(ids).logits, base)


@torch.no_grad()
def test_mistral_snapkv(mistral):
    ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(2))
    base = mistral(ids).logits
    with me.apply(mistral, "snapkv", ratio=0.0):
        assert torch.equal(mistral(ids).logits, base)
    with me.apply(mistral, "snapkv", ratio=0.5):
        out = mistral(ids, use_cache=True)
        assert [layer.keys.shape[-2] for layer in cache_of(out).layers] == [15] * 4


@torch.no_grad()
def test_simignore_on_a_text_llm_with_image_token_id():
    model = tiny_qwen2_lm(image_token_id=IMAGE_TOKEN)
    ids = torch.tensor([[1, 10, 11] + [IMAGE_TOKEN] * 16 + [12, 13, 14]])
    base = model(ids).logits
    with me.apply(model, "simignore", ratio=0.0):
        assert torch.equal(model(ids).logits, base)
    with me.apply(model, "simignore", ratio=0.25, action="drop") as h:
        out = model(ids, use_cache=True)
        assert h.stats.keep_count == [12] and h.stats.text_length == [3]
        assert [layer.keys.shape[-2] for layer in cache_of(out).layers] == [18] * 4
