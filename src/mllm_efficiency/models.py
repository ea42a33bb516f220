"""The seeds' front door: `LlavaForConditionalGeneration.from_pretrained(path, fastv_config={...})`.

Loading is done by the stock transformers class and returns a stock model instance (a subclass defined
outside `transformers.` would be treated as custom code and lose transformers' checkpoint key conversions).
A `fastv_config` dict (llava-hf keys `use_fastv`, `fastv_k`, `fastv_r`, optional `image_token_start_index` /
`image_token_length`, or the original FastV keys) attaches FastV through `apply()`; the handle is
`model.fastv_handle` and `model.set_fastv_config(cfg_or_None)` replaces or removes it.
`isinstance(model, mllm_efficiency.LlavaForConditionalGeneration)` holds for any stock LLaVA model.
"""
from __future__ import annotations

import types
from typing import Any

from transformers import LlavaForConditionalGeneration as _HFLlava

from .api import apply
from .pruning.fastv import FastVConfig


def set_fastv_config(model, fastv_config: dict[str, Any] | None) -> None:
    """Attach, replace or (with None / use_fastv False) remove FastV on `model`."""
    if getattr(model, "fastv_handle", None) is not None:
        model.fastv_handle.remove()
    model.fastv_handle = None
    cfg = FastVConfig.from_seed_dict(fastv_config) if fastv_config else None
    if cfg is not None:
        model.fastv_handle = apply(model, "fastv", **cfg.as_dict())


def _prepare(model, fastv_config):
    model.set_fastv_config = types.MethodType(set_fastv_config, model)
    model.fastv_handle = None
    if fastv_config:
        set_fastv_config(model, fastv_config)
    return model


class _FrontDoor(type):
    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, _HFLlava)

    def __subclasscheck__(cls, sub) -> bool:
        return issubclass(sub, _HFLlava)

    def __call__(cls, config, *args, fastv_config: dict[str, Any] | None = None, **kwargs):
        return _prepare(_HFLlava(config, *args, **kwargs), fastv_config)


class LlavaForConditionalGeneration(metaclass=_FrontDoor):
    """Factory with the seed's signature; instances are `transformers.LlavaForConditionalGeneration`."""

    @classmethod
    def from_pretrained(cls, *args, fastv_config: dict[str, Any] | None = None, **kwargs):
        return _prepare(_HFLlava.from_pretrained(*args, **kwargs), fastv_config)
