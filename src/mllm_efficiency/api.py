"""Public entry point: `apply(model, name, **cfg)`."""
from __future__ import annotations

from typing import Any

from .adapters import get_adapter
from .core import composition
from .core.rollback import ModelSnapshot
from .handle import MethodHandle
from .registry import get_method


def apply(model: Any, name: str, **cfg: Any) -> MethodHandle:
    """Attach method `name` to a Hugging Face model; returns a removable handle (also a context manager).

    Methods compose: call `apply` several times on the same model. Which methods may share a model is
    decided by `core.composition` before the model is touched; an attach that fails leaves the model as it was.
    """
    spec = get_method(name)
    config = spec.config_cls.from_kwargs(spec.name, **cfg)
    adapter = get_adapter(model)
    key = adapter.text_model
    adapter.check_method(spec.name, spec.family, config)  # a family's refusal (e.g. Gemma 3), named and explained
    composition.check(key, spec.name, spec.family, config)
    snapshot = ModelSnapshot(model)
    try:
        attached = spec.attach(model, adapter, config)
    except BaseException:
        snapshot.restore()
        raise
    composition.record(key, spec.name, spec.family, config)
    return MethodHandle(spec.name, config, attached, model, on_remove=lambda: composition.forget(key, spec.name))
