"""What a method needs to know about a model family, in one place."""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn


class ModelAdapter:
    """Locates the decoder stack, its layers and attention modules, and the visual tokens of a prompt.

    `model` is the object the user calls (its forward receives `input_ids`); `text_model` is the decoder
    stack (`LlamaModel`, `Qwen2Model`, ...) with `.layers`, `.norm` and `.rotary_emb`.
    """

    family: str = "decoder"
    uses_mrope: bool = False

    def __init__(self, model: nn.Module, text_model: nn.Module, visual_token_ids: Sequence[int] = ()):
        self.model = model
        self.text_model = text_model
        self.visual_token_ids = tuple(int(t) for t in visual_token_ids if t is not None)
        params = inspect.signature(text_model.forward).parameters
        # transformers >= 5.24 names the cache argument `cache`; earlier 5.x releases `past_key_values`.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def text_config(self):
        return self.text_model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.text_model.layers)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    def sliding_window_layers(self) -> list[int]:
        types = getattr(self.text_config, "layer_types", None) or []
        return [i for i, t in enumerate(types) if t != "full_attention"]

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Bool (B, L): positions holding an image/video token id, or None if the family knows no such id."""
        if not self.visual_token_ids:
            return None
        ids = torch.tensor(self.visual_token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids)

    def describe(self) -> str:
        return f"{self.family} ({type(self.model).__name__}, {self.num_layers} layers)"
