"""Builders of tiny random-weight models from configs: one place, used by every test.

Each builder deep-copies its config dict (transformers mutates and shares config objects) and seeds
torch so the weights are reproducible.
"""
from __future__ import annotations

import copy

import torch

IMAGE_TOKEN = 127
VOCAB = 128

_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
_VISION = dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=32,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


def _text_config(num_layers: int, **over):
    cfg = copy.deepcopy(_TEXT)
    cfg["num_hidden_layers"] = num_layers
    cfg.update(over)
    return cfg


def tiny_llava(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32,
               image_size: int = 32):
    """LLaVA-1.5 shaped: Llama text model + tiny CLIP tower; an image of `image_size` gives
    (image_size/8)**2 image tokens (16 by default)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = copy.deepcopy(_VISION)
    vision["image_size"] = image_size
    text = _text_config(num_layers, model_type="llama")
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(image_size // 8) ** 2, projector_hidden_act="gelu",
                      attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg).to(dtype).eval()


def tiny_llama_lm(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**_text_config(num_layers, **over), attn_implementation=attn_implementation)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2_lm(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, **over):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**_text_config(num_layers, **over), attn_implementation=attn_implementation)
    return Qwen2ForCausalLM(cfg).eval()


def llava_prompt(num_images: int = 1, prefix=(1, 10, 11), between=(20, 21), suffix=(12, 13, 14),
                 tokens_per_image: int = 16, image_size: int = 32, seed: int = 0):
    """input_ids with every image placeholder expanded, and matching pixel_values (batch 1)."""
    ids = list(prefix)
    for i in range(num_images):
        if i:
            ids += list(between)
        ids += [IMAGE_TOKEN] * tokens_per_image
    ids += list(suffix)
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_images, 3, image_size, image_size, generator=g)
    return torch.tensor([ids]), pixel_values
