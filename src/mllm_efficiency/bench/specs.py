"""`method:params` entries of the benchmark command line.

    vanilla                                   no method attached
    fastv:k=2,ratio=0.75                      one method with its config fields
    fastv:k=2,ratio=0.5+snapkv:ratio=0.5      methods chained with '+', applied in that order
    l2norm:ratio=0.5,skip_layers=0/1          '/' separates the items of a tuple value

Values parse as int, float, true/false, none, a '/'-separated tuple, else a string. Every entry is checked against
the registry and the method's config dataclass before any model is built, so a typo fails in milliseconds with a
message naming the entry, the method and the parameter.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError

VANILLA = "vanilla"


@dataclasses.dataclass(frozen=True)
class MethodCall:
    name: str
    params: dict

    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())


@dataclasses.dataclass(frozen=True)
class BenchEntry:
    """One measured arm: methods applied in order (empty = vanilla)."""

    methods: tuple[MethodCall, ...]

    @property
    def is_vanilla(self) -> bool:
        return not self.methods

    @property
    def label(self) -> str:
        return VANILLA if self.is_vanilla else "+".join(m.label() for m in self.methods)


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "/".join(_fmt(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return "none" if v is None else str(v)


def parse_value(text: str) -> Any:
    if "/" in text:
        return tuple(parse_value(t) for t in text.split("/") if t != "")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_entry(text: str) -> BenchEntry:
    """Parse and validate one entry (see the module docstring); raises ConfigError naming what is wrong."""
    from ..registry import available_methods, get_method

    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"method entry must be a non-empty string like 'fastv:k=2,ratio=0.5', got {text!r}")
    text = text.strip()
    if text.lower() in (VANILLA, "none"):
        return BenchEntry(())
    calls: list[MethodCall] = []
    for part in text.split("+"):
        part = part.strip()
        if not part:
            raise ConfigError(f"method entry {text!r}: empty method between '+' signs")
        name, _, rest = part.partition(":")
        name = name.strip().lower()
        if name == VANILLA:
            raise ConfigError(f"method entry {text!r}: 'vanilla' cannot be chained with other methods")
        if name not in available_methods():
            raise ConfigError(f"method entry {text!r}: unknown method {name!r}; available: "
                              f"{[VANILLA] + available_methods()}")
        if any(c.name == name for c in calls):
            raise ConfigError(f"method entry {text!r}: method {name!r} appears twice")
        params: dict = {}
        for item in rest.split(",") if rest.strip() else []:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise ConfigError(f"method entry {text!r}: parameter {item!r} of {name} must be written key=value")
            if key in params:
                raise ConfigError(f"method entry {text!r}: parameter {key!r} of {name} given twice")
            params[key] = parse_value(value.strip())
        spec = get_method(name)
        try:
            spec.config_cls.from_kwargs(name, **params)
        except ConfigError as e:
            raise ConfigError(f"method entry {text!r}: {e}") from None
        except TypeError as e:  # a value of the wrong type reaching a comparison in validation
            raise ConfigError(f"method entry {text!r}: bad parameter value for {name}: {e}") from None
        calls.append(MethodCall(name, params))
    return BenchEntry(tuple(calls))


def parse_entries(texts) -> list[BenchEntry]:
    entries = [parse_entry(t) for t in texts]
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"method entries repeat {dup}; list each entry once")
    return entries
