"""Method chains for evaluation: `"fastv+snapkv"` plus flat parameters, as lmms-eval model_args give them.

A bare parameter (`ratio=0.5`) goes to every method of the chain that has that field; `fastv.k=3` goes to FastV
only. A parameter no method of the chain accepts is an error, so a typo never runs silently as the default.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError
from ..registry import available_methods, get_method

NO_METHOD = ("", "none", "vanilla", "baseline", "full")


@dataclasses.dataclass(frozen=True)
class MethodChain:
    names: tuple[str, ...]
    configs: tuple[dict, ...]  # validated kwargs per method (only the ones given)

    @property
    def label(self) -> str:
        return "+".join(self.names) if self.names else "vanilla"

    def apply(self, model) -> list:
        from ..api import apply

        handles = []
        try:
            for name, cfg in zip(self.names, self.configs):
                handles.append(apply(model, name, **cfg))
        except Exception:
            for h in reversed(handles):
                h.remove()
            raise
        return handles


def split_names(method: str | None) -> tuple[str, ...]:
    text = (method or "").strip().lower()
    if text in NO_METHOD:
        return ()
    names = tuple(n.strip() for n in text.replace(",", "+").split("+"))
    known = available_methods()
    for n in names:
        if n not in known:
            raise ConfigError(f"method: unknown method {n!r}; available: {['vanilla'] + known} "
                              "(chain several with '+', e.g. fastv+snapkv)")
    if len(set(names)) != len(names):
        raise ConfigError(f"method: {method!r} names a method twice")
    return names


def parse_chain(method: str | None, params: dict[str, Any] | None = None) -> MethodChain:
    """Validate a chain and route `params` to its methods (every config is built once, so range errors show now)."""
    names = split_names(method)
    params = dict(params or {})
    per: list[dict] = [{} for _ in names]
    fields = [set(get_method(n).config_cls.field_names()) for n in names]
    for key, value in params.items():
        if "." in key:
            target, field = key.split(".", 1)
            if target not in names:
                raise ConfigError(f"parameter {key!r} names method {target!r}, which is not in the chain {list(names)}")
            i = names.index(target)
            if field not in fields[i]:
                raise ConfigError(f"{target}: unknown parameter {field!r}; allowed: {sorted(fields[i])}")
            per[i][field] = value
            continue
        takers = [i for i, f in enumerate(fields) if key in f]
        if not takers:
            allowed = sorted(set().union(*fields)) if fields else []
            where = f"the methods {list(names)}" if names else "vanilla (no method)"
            raise ConfigError(f"parameter {key!r} is not accepted by {where}; allowed: {allowed}")
        for i in takers:
            per[i].setdefault(key, value)
    for n, cfg in zip(names, per):
        get_method(n).config_cls.from_kwargs(n, **cfg)  # raises ConfigError naming the field and range
    return MethodChain(names, tuple(per))
