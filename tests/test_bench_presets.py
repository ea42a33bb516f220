"""Size presets of the benchmark harness and the prompts built for them."""
from __future__ import annotations

import pytest
import torch

from mllm_efficiency.bench.presets import PRESETS, build_config, build_preset, model_class
from mllm_efficiency.bench.prompts import PromptShape, build_prompt
from mllm_efficiency.errors import ConfigError


@pytest.mark.parametrize("name,billions", [("llama-2-7b", 6.74), ("llama-3-8b", 8.03), ("qwen2-7b", 7.62),
                                           ("llava-1.5-7b", 7.06), ("qwen2-vl-7b", 8.29)])
def test_full_size_parameter_counts(name, billions):
    with torch.device("meta"):
        model = model_class(PRESETS[name])(build_config(PRESETS[name], "sdpa"))
    n = sum(p.numel() for p in model.parameters()) / 1e9
    assert n == pytest.approx(billions, rel=0.02)


@pytest.mark.parametrize("name,shape,visual", [
    ("tiny-llava", PromptShape(images=3, context=10), 48),
    ("tiny-llava-onevision", PromptShape(frames=4, context=10), 17),  # 4 frames x 2x2 pooled + newline
    ("tiny-qwen2-vl", PromptShape(images=2, tokens_per_image=4, frames=4, context=10), 2 * 4 + 2 * 4),
])
def test_tiny_vlm_prompts_run(name, shape, visual):
    model = build_preset(name, "cpu", torch.float32, tokens_per_image=shape.tokens_per_image)
    prompt = build_prompt(model, shape, "cpu", torch.float32)
    assert prompt.visual_tokens == visual and prompt.vision is not None
    with torch.inference_mode():
        out = model(**prompt.inputs, use_cache=True, logits_to_keep=1)
    assert out.logits.shape[:2] == (1, 1)


def test_tokens_per_image_sizes_the_vision_tower():
    cfg = build_config(PRESETS["llava-1.5-7b"], "sdpa", tokens_per_image=144)
    assert cfg.vision_config.image_size == 12 * 14
    with pytest.raises(ConfigError, match="perfect square"):
        build_config(PRESETS["tiny-llava"], "sdpa", tokens_per_image=15)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="presets"):
        build_preset("llava-99b", "cpu", torch.float32)
