"""The embedded default VLM ("shapes-vlm"): a pretrained LLM backbone (SmolLM2-135M-Instruct from the zoo) plus a
small CLIP vision tower and a 2-layer projector trained by scripts/train_tiny_vlm.py on the synthetic shapes data,
optionally with low-rank (LoRA) updates of the backbone's linear layers. It is an ordinary
`LlavaForConditionalGeneration` (the LoRA updates are merged into the weights when it is assembled), so every
method runs on it unchanged.

Only the trained parts (vision tower + projector + LoRA factors, fp16 safetensors, <= 20 MB) are stored in the
package, under ``assets/shapes_vlm/``; `load_shapes_vlm()` assembles the full model offline from the backbone
package and them.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .local_processor import llava_processor

ALIAS = "shapes-vlm"
BACKBONE = "smollm2-135m"
ASSETS_DIR = Path(__file__).parent / "assets" / "shapes_vlm"
WEIGHTS_FILE = "vision_projector.safetensors"
INFO_FILE = "train_info.json"
IMAGE_TOKEN = "<empty_output>"  # an unused special token of SmolLM2's vocabulary: no new embedding row needed
IMAGE_SIZE = 96
PATCH_SIZE = 12  # (96 / 12)**2 = 64 image tokens per image
VISION_CONFIG = dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=256,
                     intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, projection_dim=256)
TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
LANGUAGE_PREFIX = "model.language_model."
# A LoRA update of the linear layer at module path P is stored as P + ".lora_A" (rank x in) and P + ".lora_B"
# (out x rank, scale folded in); assembling adds lora_B @ lora_A to P's weight.
LORA_A, LORA_B = ".lora_A", ".lora_B"


def tokens_per_image(image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> int:
    return (image_size // patch_size) ** 2


def llava_config(text_config: Any, image_token_id: int, vision_config: dict | None = None,
                 attn_implementation: str = "sdpa", vision_feature_layer: int = -1):
    from transformers import LlavaConfig

    vision = dict(VISION_CONFIG if vision_config is None else vision_config)
    n = (vision["image_size"] // vision["patch_size"]) ** 2
    layers = vision.get("num_hidden_layers", VISION_CONFIG["num_hidden_layers"])
    if not isinstance(vision_feature_layer, int) or not -(layers + 1) <= vision_feature_layer <= layers:
        raise ConfigError(f"vision_feature_layer must be an integer in [{-(layers + 1)}, {layers}] (hidden states "
                          f"of a {layers}-layer tower; 0 = the patch embeddings), got {vision_feature_layer!r}")
    if vision_feature_layer >= 0:  # stored negative: transformers reads a layer index of 0 as "no hidden states"
        vision_feature_layer -= layers + 1
    text = text_config.to_dict() if hasattr(text_config, "to_dict") else dict(text_config)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token_id,
                       vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default",
                       image_seq_length=n,
                       projector_hidden_act="gelu", tie_word_embeddings=text.get("tie_word_embeddings", False),
                       attn_implementation=attn_implementation)


def assemble(lm, tokenizer, *, vision_config: dict | None = None, image_token: str = IMAGE_TOKEN,
             trained: dict[str, torch.Tensor] | None = None, seed: int = 0, attn_implementation: str = "sdpa",
             vision_feature_layer: int = -1):
    """LLaVA from a causal LM (its weights copied, plus the LoRA updates in `trained` if any) + a vision tower /
    projector (`trained`, or random with `seed`). Returns (model, processor)."""
    from transformers import LlavaForConditionalGeneration

    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ConfigError(f"image_token {image_token!r} is not a token of the backbone's tokenizer")
    cfg = llava_config(lm.config, image_token_id, vision_config, attn_implementation, vision_feature_layer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    embed = model.model.language_model.embed_tokens.weight
    if cfg.tie_word_embeddings:
        model.lm_head.weight = embed
    else:
        with torch.no_grad():
            model.lm_head.weight.copy_(lm.lm_head.weight)
    if trained is not None:
        load_trained_parts(model, trained)
    model = model.to(lm.dtype).eval()
    vision = cfg.vision_config
    processor = llava_processor(tokenizer, vision.image_size, vision.patch_size, image_token)
    return model, processor


def trained_parts(model) -> dict[str, torch.Tensor]:
    """The state dict of what training changes (vision tower + projector)."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}


def split_lora(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(plain tensors, {module path: (lora_A, lora_B)}) of a trained-parts state dict."""
    plain, factors = {}, {}
    for k, v in state.items():
        for suffix, slot in ((LORA_A, 0), (LORA_B, 1)):
            if k.endswith(suffix):
                factors.setdefault(k[:-len(suffix)], [None, None])[slot] = v
                break
        else:
            plain[k] = v
    for path, (a, b) in factors.items():
        if a is None or b is None:
            raise ConfigError(f"LoRA update of {path!r} needs both {path + LORA_A!r} and {path + LORA_B!r}")
    return plain, {p: (a, b) for p, (a, b) in factors.items()}


def merge_lora(model, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add lora_B @ lora_A to the weight of each named linear layer of the language model (in float32)."""
    for path, (a, b) in factors.items():
        if not path.startswith(LANGUAGE_PREFIX):
            raise ConfigError(f"LoRA updates are only allowed on the language model ({LANGUAGE_PREFIX}*), got {path!r}")
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"LoRA update names no module of this model: {path!r}") from None
        if not isinstance(layer, torch.nn.Linear):
            raise ConfigError(f"LoRA update of {path!r}: expected an nn.Linear, got {type(layer).__name__}")
        w = layer.weight
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ConfigError(f"LoRA update of {path!r}: factors {tuple(b.shape)} @ {tuple(a.shape)} do not give the "
                              f"weight's shape {tuple(w.shape)}")
        with torch.no_grad():
            w.copy_((w.float() + b.float() @ a.float()).to(w.dtype))


def load_trained_parts(model, state: dict[str, torch.Tensor]) -> None:
    state, factors = split_lora(state)
    expected = set(trained_parts(model))
    got = set(state)
    if got != expected:
        raise ConfigError(f"trained weights do not fit this model: missing {sorted(expected - got)[:5]}, "
                          f"unexpected {sorted(got - expected)[:5]}")
    own = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    merge_lora(model, factors)


def save_trained_parts(model, out_dir: str | Path, info: dict | None = None, dtype=torch.float16,
                       lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Write the vision tower + projector (+ LoRA factors {module path: (A, B with its scale folded in)})."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(trained_parts(model))
    for path, (a, b) in (lora or {}).items():
        state[path + LORA_A], state[path + LORA_B] = a, b
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {"vision_config": model.config.vision_config.to_dict(),
            "vision_feature_layer": model.config.vision_feature_layer, **(info or {})}
    (out / INFO_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return out / WEIGHTS_FILE


def has_trained_weights(weights_dir: str | Path = ASSETS_DIR) -> bool:
    return (Path(weights_dir) / WEIGHTS_FILE).is_file()


def load_shapes_vlm(weights_dir: str | Path | None = None, *, backbone: str = BACKBONE, dtype: Any = None,
                    device: Any = "cpu", attn_implementation: str = "sdpa", allow_untrained: bool = True):
    """Assemble the default VLM offline: backbone from the zoo + trained vision tower/projector from `weights_dir`
    (default: the package's assets). Without trained weights it warns and uses a seeded random tower, unless
    `allow_untrained=False`. Returns (model, processor)."""
    from safetensors.torch import load_file

    from ..zoo import load_model

    weights_dir = Path(weights_dir) if weights_dir is not None else ASSETS_DIR
    lm, tok = load_model(backbone, dtype=dtype, device="cpu", attn_implementation=attn_implementation)
    trained, vision_config, feature_layer = None, None, -1
    if has_trained_weights(weights_dir):
        trained = load_file(str(weights_dir / WEIGHTS_FILE))
        info_path = weights_dir / INFO_FILE
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            vc, feature_layer = info.get("vision_config"), info.get("vision_feature_layer", -1)
            if vc:
                vision_config = {k: vc[k] for k in VISION_CONFIG if k in vc}
    elif not allow_untrained:
        raise FileNotFoundError(f"no trained weights at {weights_dir / WEIGHTS_FILE}; train them with "
                                "scripts/train_tiny_vlm.py (see benchmarks/eval/README.md)")
    else:
        warnings.warn(f"{ALIAS}: no trained vision weights at {weights_dir}; using an UNTRAINED random vision "
                      "tower (scores are chance level)", stacklevel=2)
    model, processor = assemble(lm, tok, vision_config=vision_config, trained=trained,
                                vision_feature_layer=feature_layer,
                                attn_implementation=attn_implementation)
    del lm
    if device is not None:
        model = model.to(device)
    return model, processor
