"""Named model-size configs with random weights, for latency and memory (values do not matter there).

Each preset is a text decoder (`llama` / `qwen2` numbers from the published configs) and, for VLMs, a vision
tower, built directly on the target device in the target dtype by :func:`build_preset`. The vision tower's
image size follows the requested tokens per image, so `--tokens-per-image` changes the real vision work.

    llama-2-7b, llama-3-8b, qwen2-7b                     text LLMs
    llava-1.5-7b        LLaVA-1.5: CLIP ViT-L/14 + Llama-2-7B (Vicuna), 576 tokens per 336 px image
    llava-onevision-7b  SigLIP-so400m/14 + Qwen2-7B; 729 tokens per 384 px view, video frames pooled to 14x14
    qwen2-vl-7b         Qwen2-VL-7B: 675M ViT (merge 2x2) + Qwen2-7B text with M-RoPE
    tiny-*              the same families at hidden size 64, for CPU smoke runs and tests
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math

from ..errors import ConfigError
from .models import build_random_model

_LLAMA2_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=65536, rope_theta=10000.0,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                  rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001)
_QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=65536, rope_theta=1e6,
                 rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                 use_sliding_window=False)
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
_TINY_QWEN = dict(_TINY, use_sliding_window=False)

_CLIP_L14 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
_SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                      num_hidden_layers=27, num_attention_heads=16, patch_size=14)
_QWEN2VL_VIT = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3)
_TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, patch_size=8, projection_dim=32)
_TINY_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, patch_size=8)
_TINY_QWEN_VIT = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    family: str  # llama | qwen2 | llava | llava_onevision | qwen2_vl
    text: dict
    vision: dict | None = None
    tokens_per_image: int = 0  # default visual tokens per image (per view for OneVision)
    description: str = ""

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("llama-2-7b", "llama", _LLAMA2_7B, description="Llama-2-7B (MHA, 512 KiB KV per token)"),
    Preset("llama-3-8b", "llama", _LLAMA3_8B, description="Llama-3-8B (GQA 8 KV heads, 128 KiB KV per token)"),
    Preset("qwen2-7b", "qwen2", _QWEN2_7B, description="Qwen2-7B (GQA 4 KV heads, 56 KiB KV per token)"),
    Preset("llava-1.5-7b", "llava", _LLAMA2_7B, _CLIP_L14, 576, "LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B"),
    Preset("llava-onevision-7b", "llava_onevision", _QWEN2_7B, _SIGLIP_SO400M, 729,
           "LLaVA-OneVision-7B: SigLIP-so400m + Qwen2-7B"),
    Preset("qwen2-vl-7b", "qwen2_vl", _QWEN2_7B, _QWEN2VL_VIT, 729, "Qwen2-VL-7B: 675M ViT + Qwen2-7B, M-RoPE"),
    Preset("tiny-llama", "llama", _TINY, description="tiny Llama (CPU smoke)"),
    Preset("tiny-qwen2", "qwen2", _TINY_QWEN, description="tiny Qwen2 (CPU smoke)"),
    Preset("tiny-llava", "llava", _TINY, _TINY_CLIP, 16, "tiny LLaVA (CPU smoke)"),
    Preset("tiny-llava-onevision", "llava_onevision", _TINY_QWEN, _TINY_SIGLIP, 16, "tiny LLaVA-OneVision"),
    Preset("tiny-qwen2-vl", "qwen2_vl", _TINY_QWEN, _TINY_QWEN_VIT, 16, "tiny Qwen2-VL (M-RoPE)"),
]}

# visual token ids placed just below the vocabulary size (never produced by random text ids)
_TOKEN_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def visual_token_ids(preset: Preset) -> dict[str, int]:
    v = preset.text["vocab_size"]
    return {name: v - 1 - i for i, name in enumerate(_TOKEN_IDS)}


def image_side(preset: Preset, tokens_per_image: int) -> int:
    """Image side in pixels giving `tokens_per_image` tokens (a perfect square) for this vision tower."""
    side = math.isqrt(tokens_per_image)
    if tokens_per_image < 1 or side * side != tokens_per_image:
        raise ConfigError(f"tokens_per_image must be a perfect square >= 1 (a square patch grid) for "
                          f"{preset.name}, got {tokens_per_image}")
    patch = preset.vision["patch_size"]
    if preset.family == "qwen2_vl":
        return side * preset.vision["spatial_merge_size"] * patch
    return side * patch


def _rope_kwargs(cfg_cls, text: dict, mrope_section=None) -> dict:
    text = dict(text)
    theta = text.pop("rope_theta")
    fields = getattr(cfg_cls, "__dataclass_fields__", None) or inspect.signature(cfg_cls).parameters
    if "rope_parameters" in fields:  # transformers 5.x
        rp = {"rope_type": "default", "rope_theta": theta}
        if mrope_section is not None:
            rp["mrope_section"] = list(mrope_section)
        text["rope_parameters"] = rp
    else:
        text["rope_theta"] = theta
        if mrope_section is not None:
            text["rope_scaling"] = {"type": "mrope", "mrope_section": list(mrope_section)}
    return text


def build_config(preset: Preset, attn: str, tokens_per_image: int | None = None):
    """The HF config of `preset` (a fresh object each call: transformers mutates configs it is given)."""
    import transformers as T

    text = copy.deepcopy(preset.text)
    if preset.family in ("llama", "qwen2"):
        cls = T.LlamaConfig if preset.family == "llama" else T.Qwen2Config
        return cls(**_rope_kwargs(cls, text), tie_word_embeddings=False, attn_implementation=attn)
    tpi = tokens_per_image or preset.tokens_per_image
    side = image_side(preset, tpi)
    ids = visual_token_ids(preset)
    vision = copy.deepcopy(preset.vision)
    if preset.family == "qwen2_vl":
        text_cls = getattr(T, "Qwen2VLTextConfig", T.Qwen2VLConfig)
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        quarter = head_dim // 2
        section = [quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8]  # 7B: [16, 24, 24]
        text = _rope_kwargs(text_cls, dict(text, model_type="qwen2_vl_text"), section)
        vision["hidden_size"] = text["hidden_size"]
        return T.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                               attn_implementation=attn, **ids)
    vision["image_size"] = side
    text_type = "llama" if preset.family == "llava" else "qwen2"
    text_cls = T.LlamaConfig if text_type == "llama" else T.Qwen2Config
    text = _rope_kwargs(text_cls, dict(text, model_type=text_type))
    if preset.family == "llava":
        return T.LlavaConfig(text_config=text, vision_config=vision, image_token_index=ids["image_token_id"],
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_seq_length=tpi, projector_hidden_act="gelu", tie_word_embeddings=False,
                             attn_implementation=attn)
    return T.LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=ids["image_token_id"],
                                  video_token_index=ids["video_token_id"], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=[[side, side]],
                                  vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu",
                                  tie_word_embeddings=False, attn_implementation=attn)


def model_class(preset: Preset):
    import transformers as T

    return {"llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM, "llava": T.LlavaForConditionalGeneration,
            "llava_onevision": T.LlavaOnevisionForConditionalGeneration,
            "qwen2_vl": T.Qwen2VLForConditionalGeneration}[preset.family]


def build_preset(name: str, device, dtype, attn: str = "sdpa", tokens_per_image: int | None = None,
                 seed: int = 0):
    """A random-weight model of preset `name`, built on `device` in `dtype`."""
    preset = get_preset(name)
    config = build_config(preset, attn, tokens_per_image)
    return build_random_model(model_class(preset), config, device, dtype, seed)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]
