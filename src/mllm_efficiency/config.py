"""Base class and the validators of every method config (frozen dataclasses).

Besides each config's own `validate()`, every config passes two checks of its fields by type: a field annotated
`bool` takes only True/False (not "no" or 1), and no number anywhere in a field (tuples included) is NaN or ±inf.
Checks that need the model (layer indices, sizes bounded by the context length) are `check_*` helpers the
methods call at attach time.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Frozen, validated settings of one method. Subclasses implement `validate()`."""

    def __post_init__(self) -> None:
        self.validate()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _is_bool_annotation(f.type) and not (value is None and "None" in str(f.type)):
                check_bool(f.name, value)
            _check_finite(f.name, value)

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, method: str, **kwargs: Any) -> "MethodConfig":
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"{method}: unknown parameter(s) {unknown}; allowed: {cls.field_names()}"
            )
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "MethodConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_bool_annotation(annotation: Any) -> bool:
    text = str(annotation).replace("typing.", "")
    return text in ("bool", "bool | None", "None | bool", "Optional[bool]") or annotation is bool


def _check_finite(name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _check_finite(f"{name}[{i}]", v)


def is_number(value: Any) -> bool:
    """A finite real number given as int or float (a bool is not one, nor NaN or ±inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite number in the interval from `low` to `high` (None = unbounded; `*_open` excludes the bound)."""
    ok = is_number(value)
    if ok:
        v = float(value)
        ok = (low is None or (v > low if low_open else v >= low)) and (high is None or (v < high if high_open else v <= high))
    if not ok:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be in {lo}, {hi} (a finite number), got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def check_token_ids(name: str, value: Any) -> tuple[int, ...]:
    """A non-empty sequence of token ids (ints >= 0), returned as a tuple."""
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    if not ok:
        raise ConfigError(f"{name} must be a non-empty sequence of token ids (ints >= 0), got {value!r}")
    return tuple(value)


def check_layer_indices(name: str, layers: Iterable[int], num_layers: int) -> None:
    """At attach time: every index names one of the model's `num_layers` decoder layers."""
    for n, i in enumerate(layers):
        if not 0 <= i < num_layers:
            raise ConfigError(f"{name}[{n}] = {i} is not a layer of this model: allowed [0, {num_layers - 1}] "
                              f"({num_layers} decoder layers)")


def check_unit_fraction(name: str, value: Any) -> None:
    """A fraction in (0, 1]."""
    if not is_number(value) or not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")


def check_similarity(name: str, value: Any, kind: str = "cosine") -> None:
    """A similarity threshold in [-1, 1]; `kind` names the measure in the message (cosine, sign similarity)."""
    if not is_number(value) or not (-1.0 <= float(value) <= 1.0):
        raise ConfigError(f"{name} must be a {kind} in [-1, 1], got {value!r}")


def check_ratio(name: str, value: float) -> None:
    if not is_number(value) or not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{name} must be a fraction removed in [0, 1), got {value!r}")


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """Integer in [low, high] (inclusive bounds, None = unbounded)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")



def layer_tuple(method: str, name: str, value: Any, low: int) -> tuple[int, ...]:
    """A non-empty, strictly increasing tuple of layer indices >= low (a list is accepted and converted)."""
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"{method}: {name} must be a tuple or list, got {value!r}")
    value = tuple(value)
    if not value:
        raise ConfigError(f"{method}: {name} needs at least one layer")
    for i, layer in enumerate(value):
        check_int(f"{name}[{i}]", layer, low)
    if list(value) != sorted(set(value)):
        raise ConfigError(f"{method}: {name} must be strictly increasing, got {value}")
    return value

def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_fraction(name: str, value: Any, low: float = 0.0, high: float = 1.0, low_open: bool = False) -> None:
    """A number in [low, high] (`low_open`: (low, high])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and v <= high
    if not ok:
        lo = "(" if low_open else "["
        raise ConfigError(f"{name} must be in {lo}{low}, {high}], got {value!r}")


def to_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (numpy integers included) in [minimum, maximum], returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        if maximum is not None:
            raise ConfigError(f"{name} must be in [{minimum}, {maximum}], got {value}")
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


def to_real(name: str, value: Any, minimum: float | None = None) -> float:
    """A finite real number (numpy scalars included) >= minimum, returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def to_ratio(ratio: Any) -> float:
    """Token pruning's `ratio`: the fraction of visual tokens dropped, in [0, 1), returned as float."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ConfigError(f"ratio must be a number in [0, 1), got {ratio!r}")
    ratio = float(ratio)
    if not (0.0 <= ratio < 1.0):
        raise ConfigError(f"ratio must be in [0, 1) (fraction of visual tokens dropped), got {ratio}")
    return ratio
