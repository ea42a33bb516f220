"""Model adapters: one per family; methods only talk to these."""
from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter

# decoder stack class name -> family
DECODER_FAMILIES = {"LlamaModel": "llama", "Qwen2Model": "qwen2", "MistralModel": "mistral"}
VLM_WRAPPERS = ("LlavaForConditionalGeneration", "LlavaModel")


class DecoderLMAdapter(ModelAdapter):
    """Text LLMs (Llama, Qwen2, Mistral). Visual tokens exist only if the config names an image token id."""


class LlavaAdapter(ModelAdapter):
    family = "llava"


def _class_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def supported_models() -> list[str]:
    return sorted(set(DECODER_FAMILIES) | {n.replace("Model", "ForCausalLM") for n in DECODER_FAMILIES}
                  | set(VLM_WRAPPERS))


def get_adapter(model: nn.Module) -> ModelAdapter:
    names = _class_names(model)
    if names & set(VLM_WRAPPERS):
        inner = model.model if "LlavaForConditionalGeneration" in names else model
        text = inner.language_model
        _check_decoder(text, model)
        cfg = model.config
        ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)]
        adapter = LlavaAdapter(model, text, ids)
        return adapter
    text = model
    if not (_class_names(model) & set(DECODER_FAMILIES)):
        text = getattr(model, "model", None)
    if text is None or not (_class_names(text) & set(DECODER_FAMILIES)):
        raise UnsupportedModelError(
            f"unsupported model family {type(model).__name__}; supported: {supported_models()}"
        )
    adapter = DecoderLMAdapter(model, text, [getattr(model.config, "image_token_id", None)])
    adapter.family = DECODER_FAMILIES[next(iter(_class_names(text) & set(DECODER_FAMILIES)))]
    return adapter


def _check_decoder(text: nn.Module, model: nn.Module) -> None:
    if not (_class_names(text) & set(DECODER_FAMILIES)):
        raise UnsupportedModelError(
            f"unsupported language model {type(text).__name__} inside {type(model).__name__}; "
            f"supported decoder families: {sorted(DECODER_FAMILIES)}"
        )


__all__ = ["ModelAdapter", "get_adapter", "supported_models", "DECODER_FAMILIES"]
