"""Base class and validation helpers for method configs (frozen dataclasses)."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Frozen, validated settings of one method. Subclasses implement `validate()`."""

    def __post_init__(self) -> None:
        self.validate()

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


def is_number(value: Any) -> bool:
    """A real number given as int or float (a bool is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
