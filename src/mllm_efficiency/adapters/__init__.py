"""Model adapters: one per family; methods only talk to these."""
from __future__ import annotations

import typing

import torch
from torch import nn

from ..errors import UnsupportedMethodError, UnsupportedModelError
from .base import ModelAdapter

# decoder stack class name -> family
DECODER_FAMILIES = {"LlamaModel": "llama", "Qwen2Model": "qwen2", "MistralModel": "mistral",
                    "Qwen2VLTextModel": "qwen2_vl", "Qwen2_5_VLTextModel": "qwen2_5_vl",
                    "Qwen3VLTextModel": "qwen3_vl", "Gemma3TextModel": "gemma3"}
MROPE_DECODERS = {"Qwen2VLTextModel", "Qwen2_5_VLTextModel", "Qwen3VLTextModel"}
# VLM class name -> family; the text model is `<outer>.model.language_model` (or `<inner>.language_model`)
VLM_WRAPPERS = {
    "LlavaForConditionalGeneration": "llava", "LlavaModel": "llava",
    "LlavaNextForConditionalGeneration": "llava_next", "LlavaNextModel": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision", "LlavaOnevisionModel": "llava_onevision",
    "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2VLModel": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen2_5_VLModel": "qwen2_5_vl",
    "InternVLForConditionalGeneration": "internvl", "InternVLModel": "internvl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl", "Qwen3VLModel": "qwen3_vl",
    "Gemma3ForConditionalGeneration": "gemma3", "Gemma3Model": "gemma3",
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


class Qwen3VLAdapter(VLMAdapter):
    """Qwen3-VL: interleaved M-RoPE (handled like Qwen2-VL: pruning gathers the cos/sin columns of the kept
    tokens) and DeepStack: the wrapper hands the text model `visual_pos_masks` (B, L) and one feature row per
    visual token for each DeepStack level, and the text model adds level j to the visual positions of layer
    j's output (j = 0 .. levels-1). Those additions index the full-length sequence, so a step that shrinks the
    sequence must start after the last DeepStack layer; mask mode keeps the length and may start anywhere."""

    def deepstack_layers(self) -> list[int]:
        """Decoder layers whose output receives DeepStack visual features."""
        vision = getattr(getattr(self.model, "config", None), "vision_config", None)
        return list(range(len(getattr(vision, "deepstack_visual_indexes", None) or ())))

    def check_pruning_step(self, step) -> None:
        deep = self.deepstack_layers()
        if getattr(step, "mode", "inplace") == "inplace" and deep and step.layer <= deep[-1]:
            raise UnsupportedMethodError(
                f"{type(self.model).__name__} (qwen3_vl): inplace token pruning from layer k={step.layer} is not "
                f"supported: DeepStack adds visual features to the output of decoder layers {deep} at the "
                f"positions of the full prompt, which a sequence pruned before layer {deep[-1] + 1} no longer "
                f"has. Use k >= {deep[-1] + 1}, or mode='mask' (keeps the sequence length).")


class Gemma3Adapter(VLMAdapter):
    """Gemma 3: sliding-window (local) layers interleaved with global ones, and a bidirectional mask among the
    tokens of each image (from `token_type_ids`). Every decoder layer receives the mask of its own layer type,
    and the local layers keep a window-sized cache. Methods that shrink the sequence, compress or track the KV
    cache (pruning, kv, video, memory families) would have to rebuild both masks and the windowed caches over
    the changed sequence; they are refused at `apply` with the reason, rather than run on the global layers
    alone (which would leave the local layers' caches full length and their windows over other tokens)."""

    REFUSED: typing.ClassVar[dict[str, str]] = {
        "pruning": "token pruning shrinks the sequence every later layer sees, but each layer's mask (sliding "
                   "window or global, with the bidirectional image-token blocks) is built by the model for the "
                   "full prompt and the local layers keep a window-sized cache",
        "video": "token pruning shrinks the sequence every later layer sees, but each layer's mask (sliding "
                 "window or global, with the bidirectional image-token blocks) is built by the model for the "
                 "full prompt and the local layers keep a window-sized cache",
        "kv": "KV compression keeps one tracked cache of every layer's positions, but the local layers' "
              "cache is a sliding window that drops keys by position, so the kept positions of the two layer "
              "types cannot be aligned",
        "memory": "the memory engines replace every layer's attention over the whole context, but the local "
                  "layers attend only their sliding window",
    }

    def check_method(self, name: str, family: str, config) -> None:
        reason = self.REFUSED.get(family)
        if reason is None:
            return
        cfg = self.text_config
        raise UnsupportedMethodError(
            f"{name} is not supported on {type(self.model).__name__} (gemma3): its text model interleaves "
            f"sliding-window layers {self.sliding_window_layers()} (window {getattr(cfg, 'sliding_window', None)}) "
            f"with global layers {self.global_layers()}; {reason}.")


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
        cls = {"qwen3_vl": Qwen3VLAdapter, "gemma3": Gemma3Adapter}.get(VLM_WRAPPERS[wrapper], VLMAdapter)
        adapter = cls(model, text, ids)
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


__all__ = ["DECODER_FAMILIES", "ModelAdapter", "get_adapter", "supported_models"]
