"""The one place methods are listed: name -> (family, config dataclass, implementation)."""
from __future__ import annotations

import dataclasses
from typing import Callable

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str
    config_cls: type
    attach: Callable  # attach(model, adapter, config) -> AttachedMethod
    summary: str


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, *, family: str, config_cls: type, summary: str):
    """Class/function decorator: `attach(model, adapter, config)` returns an object with `remove()` and `stats`."""

    def decorator(attach):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, family, config_cls, attach, summary)
        return attach

    return decorator


# Packages whose import registers methods (their @register_method decorators run on import).
_METHOD_PACKAGES = ("pruning.fastv", "pruning.random_prune", "pruning.simignore", "pruning.divprune", "pruning.dart", "pruning.pdrop", "pruning.visionzip", "pruning.prumerge", "pruning.sparsevlm", "kv", "memory", "video")


def _load_builtin_methods() -> None:
    import importlib

    for name in _METHOD_PACKAGES:  # a missing package is an error (ModuleNotFoundError names it)
        importlib.import_module(f"{__package__}.{name}")


def available_methods(family: str | None = None) -> list[str]:
    _load_builtin_methods()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[key]


def method_specs() -> list[MethodSpec]:
    _load_builtin_methods()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]
