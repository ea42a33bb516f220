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


# ------------------------------------------------------------------ InternVL 2.5 / 3
INTERNVL_IMAGE = 125  # image context token (<IMG_CONTEXT>); the start/end markers below are text
INTERNVL_START, INTERNVL_END = 123, 124


def tiny_internvl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, version: str = "3"):
    """InternVL-shaped (`InternVLForConditionalGeneration`): InternViT-like tower on 32x32 images with 4x4
    patches (8x8 grid), pixel-shuffle downsample 0.5 -> 16 image tokens per image (`image_seq_length=16`).
    `version="3"`: Qwen2 text model (InternVL3); `version="2.5"`: Llama text model (the InternLM2-based 2.5
    checkpoints load as Llama in transformers) and mean-pooled tower without QK norm."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    if version not in ("2.5", "3"):
        raise ValueError(f"version must be '2.5' or '3', got {version!r}")
    text = _text_config(num_layers, model_type="qwen2" if version == "3" else "llama")
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=[32, 32], patch_size=[4, 4], use_qk_norm=False,
                  norm_type="layer_norm" if version == "2.5" else "rms_norm")
    cfg = InternVLConfig(text_config=text, vision_config=vision, image_token_id=INTERNVL_IMAGE,
                         image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=False, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(cfg).eval()


def internvl_prompt(num_images: int = 1, prefix=(1, 10, 11), between=(20, 21), suffix=(12, 13, 14), seed: int = 0):
    """InternVL prompt (batch 1): each image is `<img>` + 16 context tokens + `</img>`, pixel_values 32x32."""
    ids = list(prefix)
    for i in range(num_images):
        if i:
            ids += list(between)
        ids += [INTERNVL_START] + [INTERNVL_IMAGE] * 16 + [INTERNVL_END]
    ids += list(suffix)
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.tensor([ids]), pixel_values=torch.randn(num_images, 3, 32, 32, generator=g))


# ------------------------------------------------------------------ Qwen3-VL (interleaved M-RoPE, DeepStack)
QWEN3_DEEPSTACK = (0, 1)  # vision layers whose merged features are added after LLM layers 0 and 1


def tiny_qwen3_vl(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0):
    """Qwen3-VL-shaped: Qwen3 text model with interleaved M-RoPE (mrope_section [2, 3, 3] over 8 frequency
    pairs), 2-layer vision tower, 4x4 patches merged 2x2, DeepStack features from vision layers 0 and 1
    injected after LLM layers 0 and 1. Same token ids as `tiny_qwen2_vl`; prompts from `qwen3_vl_prompt`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=1, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                     mrope_interleaved=True))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                  deepstack_visual_indexes=list(QWEN3_DEEPSTACK))
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
                        vision_start_token_id=QWEN_VSTART, vision_end_token_id=QWEN_VEND,
                        attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def qwen3_vl_prompt(grids=((1, 4, 4),), prefix=(5, 6), between=(20, 21), suffix=(7, 8, 9), seed: int = 0):
    """Qwen3-VL prompt (batch 1): as `qwen_vl_prompt` (t*h*w/4 tokens per image after the 2x2 merge, wrapped
    in vision start/end tokens); pixel rows of 3*2*4*4 values."""
    return qwen_vl_prompt(grids=grids, prefix=prefix, between=between, suffix=suffix, seed=seed)


# ------------------------------------------------------------------ Gemma 3 (sliding-window + global layers)
GEMMA3_IMAGE, GEMMA3_BOI, GEMMA3_EOI = 125, 123, 124


def tiny_gemma3(num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0):
    """Gemma-3-shaped (`Gemma3ForConditionalGeneration`): Gemma 3 text model whose layers alternate
    sliding-window (window 8) and global attention (`sliding_window_pattern` 2: layers 1, 3 global), SigLIP
    tower on 32x32 images with 4x4 patches, average-pooled to 16 tokens per image (`mm_tokens_per_image=16`);
    image tokens attend to each other bidirectionally (token_type_ids)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                query_pre_attn_scalar=16, sliding_window=8, layer_types=types,
                bos_token_id=2, eos_token_id=1, pad_token_id=0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=4)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, image_token_index=GEMMA3_IMAGE,
                       boi_token_index=GEMMA3_BOI, eoi_token_index=GEMMA3_EOI, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(cfg).eval()


def gemma3_prompt(num_images: int = 1, prefix=(2, 10, 11), between=(20, 21), suffix=(12, 13, 14), seed: int = 0):
    """Gemma 3 prompt (batch 1): each image is `<start_of_image>` + 16 image tokens + `<end_of_image>`;
    token_type_ids mark the image tokens (1) for the bidirectional image mask."""
    ids = list(prefix)
    for i in range(num_images):
        if i:
            ids += list(between)
        ids += [GEMMA3_BOI] + [GEMMA3_IMAGE] * 16 + [GEMMA3_EOI]
    ids += list(suffix)
    input_ids = torch.tensor([ids])
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=input_ids, pixel_values=torch.randn(num_images, 3, 32, 32, generator=g),
                token_type_ids=(input_ids == GEMMA3_IMAGE).long())
