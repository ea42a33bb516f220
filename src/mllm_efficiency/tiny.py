"""Builders of tiny random-weight models from configs, every supported family: one place, used by the tests
(as `mllm_efficiency.testing`), the demo and the offline trace generator.

Each builder deep-copies its config dict (transformers mutates and shares config objects) and seeds
torch so the weights are reproducible.
"""
from __future__ import annotations

import copy
import inspect

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


# ------------------------------------------------------------------ LLaVA-NeXT / LLaVA-OneVision (anyres)
_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_llava_next(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = LlavaNextConfig(text_config=_text_config(num_layers, model_type="llama"), vision_config=copy.deepcopy(_VISION),
                          image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=_GRID_PINPOINTS,
                          projector_hidden_act="gelu", attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(cfg).eval()


VIDEO_TOKEN = 126


def tiny_llava_onevision(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0):
    """OneVision-shaped: Qwen2 text model, anyres images and pooled video frames."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    cfg = LlavaOnevisionConfig(text_config=_text_config(num_layers, model_type="qwen2"),
                               vision_config=copy.deepcopy(_VISION), image_token_index=IMAGE_TOKEN,
                               video_token_index=VIDEO_TOKEN, vision_feature_layer=-2,
                               vision_feature_select_strategy="default", image_grid_pinpoints=_GRID_PINPOINTS,
                               vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu",
                               attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def anyres_prompt(model, num_images: int = 1, prefix=(1, 10, 11), between=(20, 21), suffix=(12, 13, 14),
                  seed: int = 0, image_size=(64, 64)):
    """input_ids / pixel_values / image_sizes for LLaVA-NeXT or OneVision (batch 1): each image is split into
    a base view plus anyres tiles; the placeholder count per image comes from the model itself."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_images, 5, 3, 32, 32, generator=g)
    image_sizes = torch.tensor([list(image_size)] * num_images)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                               vision_feature_layer=-2, vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    counts = [f.shape[0] for f in feats]
    ids = list(prefix)
    for i, n in enumerate(counts):
        if i:
            ids += list(between)
        ids += [IMAGE_TOKEN] * n
    ids += list(suffix)
    return dict(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_sizes=image_sizes)


def onevision_video_prompt(model, frames: int = 4, prefix=(1, 10, 11), suffix=(12, 13, 14), seed: int = 0):
    """A video prompt for LLaVA-OneVision: `frames` frames of 32x32, pooled by the model."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(1, frames, 3, 32, 32, generator=g)
    with torch.no_grad():
        # the keyword is `pixel_values_videos` from transformers 5.24, `pixel_values` before
        params = inspect.signature(model.model.get_video_features).parameters
        key = "pixel_values_videos" if "pixel_values_videos" in params else "pixel_values"
        feats = model.model.get_video_features(**{key: video}, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default")
    feats = getattr(feats, "pooler_output", feats)
    n = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
    if key == "pixel_values":
        n += 1  # before 5.24 the forward appends the video newline feature after get_video_features
    ids = list(prefix) + [VIDEO_TOKEN] * n + list(suffix)
    return dict(input_ids=torch.tensor([ids]), pixel_values_videos=video)


# ------------------------------------------------------------------ Qwen2-VL / Qwen2.5-VL (M-RoPE)
QWEN_IMAGE, QWEN_VIDEO, QWEN_VSTART, QWEN_VEND = 150, 151, 148, 149
_QWEN_TEXT = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))


def _qwen_vl_config(cls, vision: dict, num_layers: int, attn_implementation: str):
    text = copy.deepcopy(_QWEN_TEXT)
    text["num_hidden_layers"] = num_layers
    return cls(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
               vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND,
               attn_implementation=attn_implementation)


def tiny_qwen2_vl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(_qwen_vl_config(Qwen2VLConfig, vision, num_layers,
                                                           attn_implementation)).eval()


def tiny_qwen2_5_vl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=16,
                  fullatt_block_indexes=[1])
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(_qwen_vl_config(Qwen2_5_VLConfig, vision, num_layers,
                                                               attn_implementation)).eval()


def qwen_vl_prompt(grids=((1, 4, 4),), prefix=(5, 6), between=(20, 21), suffix=(7, 8, 9), seed: int = 0):
    """Qwen2-VL prompt (batch 1) with one image per grid (t, h, w) in patches; each image gives
    t*h*w/4 tokens after the 2x2 merge, wrapped in vision start/end tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = list(prefix)
    pixels = []
    for i, (t, h, w) in enumerate(grids):
        if i:
            ids += list(between)
        ids += [QWEN_VSTART] + [QWEN_IMAGE] * (t * h * w // 4) + [QWEN_VEND]
        pixels.append(torch.randn(t * h * w, 3 * 2 * 4 * 4, generator=g))
    ids += list(suffix)
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(list(grids)),
                mm_token_type_ids=(input_ids == QWEN_IMAGE).int())
