"""The seeds' front door: `LlavaForConditionalGeneration.from_pretrained(path, fastv_config={...})`.

A thin subclass of the stock transformers class: loading is unchanged; a `fastv_config` dict (llava-hf
keys `use_fastv`, `fastv_k`, `fastv_r`, optional `image_token_start_index` / `image_token_length`, or the
original FastV keys) attaches FastV through `apply()`. The handle is `model.fastv_handle`.
"""
from __future__ import annotations

from typing import Any

from transformers import LlavaForConditionalGeneration as _HFLlava

from .api import apply
from .pruning.fastv import FastVConfig


class LlavaForConditionalGeneration(_HFLlava):
    def __init__(self, config, fastv_config: dict[str, Any] | None = None, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.fastv_handle = None
        if fastv_config:
            self.set_fastv_config(fastv_config)

    @classmethod
    def from_pretrained(cls, *args, fastv_config: dict[str, Any] | None = None, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.fastv_handle = None
        if fastv_config:
            model.set_fastv_config(fastv_config)
        return model

    def set_fastv_config(self, fastv_config: dict[str, Any] | None) -> None:
        """Attach, replace or (with None / use_fastv False) remove FastV."""
        if getattr(self, "fastv_handle", None) is not None:
            self.fastv_handle.remove()
            self.fastv_handle = None
        cfg = FastVConfig.from_seed_dict(fastv_config) if fastv_config else None
        if cfg is not None:
            self.fastv_handle = apply(self, "fastv", **cfg.as_dict())
