"""Public entry point: `apply(model, name, **cfg)`."""
from __future__ import annotations

from typing import Any

from .adapters import get_adapter
from .handle import MethodHandle
from .registry import get_method


def apply(model: Any, name: str, **cfg: Any) -> MethodHandle:
    """Attach method `name` to a Hugging Face model; returns a removable handle (also a context manager).

    Methods of different families compose: call `apply` several times on the same model.
    """
    spec = get_method(name)
    config = spec.config_cls.from_kwargs(spec.name, **cfg)
    adapter = get_adapter(model)
    attached = spec.attach(model, adapter, config)
    return MethodHandle(spec.name, config, attached, model)
