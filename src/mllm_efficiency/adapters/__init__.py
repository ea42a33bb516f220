"""Model adapters: one per family; methods only talk to these."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter

# decoder stack class name -> family
DECODER_FAMILIES = {"LlamaModel": "llama", "Qwen2Model": "qwen2", "MistralModel": "mistral",
                    "Qwen2VLTextModel": "qwen2_vl", "Qwen2_5_VLTextModel": "qwen2_5_vl"}
MROPE_DECODERS = {"Qwen2VLTextModel", "Qwen2_5_VLTextModel"}
# VLM class name -> family; the text model is `<outer>.model.language_model` (or `<inner>.language_model`)
VLM_WRAPPERS = {
    "LlavaForConditionalGeneration": "llava", "LlavaModel": "llava",
    "LlavaNextForConditionalGeneration": "llava_next", "LlavaNextModel": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision", "LlavaOnevisionModel": "llava_onevision",
    "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2VLModel": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen2_5_VLModel": "qwen2_5_vl",
}


class DecoderLMAdapter(ModelAdapter):
    """Text LLMs (Llama, Qwen2, Mistral). Visual tokens exist only if the config names an image token id."""


class VLMAdapter(ModelAdapter):
    """LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL: visual tokens are every position holding the
    config's image or video token id (anyres tiles, newline features and video frames included; Qwen's
    vision start/end markers are text). Qwen2-VL's text model receives M-RoPE position ids from its wrapper;
    pruning gathers their columns (through cos/sin) and never renumbers them."""

    def continuation_position_ids(self, start: int, q: int, batch: int, device) -> torch.Tensor:
        """M-RoPE ids for `q` new tokens after `start` logical tokens: the text row and the three rope rows
        shifted by the model's `rope_deltas` (what Qwen2-VL derives itself from the cache length, which a
        pruned layer 0 makes too short)."""
        deltas = getattr(getattr(self.model, "model", self.model), "rope_deltas", None)
        if deltas is None:
            raise ValueError("continuing a pruned cache on an M-RoPE model needs position_ids (the model has "
                             "no rope_deltas from its prefill)")
        text = torch.arange(start, start + q, device=device).unsqueeze(0).expand(batch, -1)
        rope = (text + deltas.to(device).view(-1, 1)).unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text.unsqueeze(0), rope], dim=0)


def _class_names(obj) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def supported_models() -> list[str]:
    causal = {n.replace("Model", "ForCausalLM") for n in ("LlamaModel", "Qwen2Model", "MistralModel")}
    return sorted(causal | {"LlamaModel", "Qwen2Model", "MistralModel"} | set(VLM_WRAPPERS))


def get_adapter(model: nn.Module) -> ModelAdapter:
    names = _class_names(model)
    wrapper = next((n for n in VLM_WRAPPERS if n in names), None)
    if wrapper is not None:
        inner = model.model if wrapper.endswith("ForConditionalGeneration") else model
        text = inner.language_model
        _check_decoder(text, model)
        cfg = model.config
        ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)]
        adapter = VLMAdapter(model, text, ids)
        adapter.family = VLM_WRAPPERS[wrapper]
        adapter.uses_mrope = bool(_class_names(text) & MROPE_DECODERS)
        return adapter
    text = model
    if not (names & set(DECODER_FAMILIES)):
        text = getattr(model, "model", None)
    if text is None or not (_class_names(text) & set(DECODER_FAMILIES)):
        raise UnsupportedModelError(
            f"unsupported model family {type(model).__name__}; supported: {supported_models()}"
        )
    adapter = DecoderLMAdapter(model, text, [getattr(model.config, "image_token_id", None)])
    adapter.family = DECODER_FAMILIES[next(iter(_class_names(text) & set(DECODER_FAMILIES)))]
    adapter.uses_mrope = bool(_class_names(text) & MROPE_DECODERS)
    return adapter


def _check_decoder(text: nn.Module, model: nn.Module) -> None:
    if not (_class_names(text) & set(DECODER_FAMILIES)):
        raise UnsupportedModelError(
            f"unsupported language model {type(text).__name__} inside {type(model).__name__}; "
            f"supported decoder families: {sorted(DECODER_FAMILIES)}"
        )


__all__ = ["ModelAdapter", "get_adapter", "supported_models", "DECODER_FAMILIES"]
