"""Which methods may be attached to one model together: the only place these rules live.

`apply` calls `check` before it touches the model, and `record` / `forget` keep the list of methods attached
to each decoder stack (keyed weakly, so nothing is stored on the model itself). The rules:
- every method appears at most once per model;
- a block-memory method replaces every layer's attention with its own: it stacks with nothing;
- one KV compression method per model (each decides what the same cache keeps);
- named pairs that break each other's assumptions are exclusive (see `_EXCLUSIVE`).
Everything else stacks (e.g. FastV + SnapKV, SimIgnore + FastV, Focus + FastV).
"""
from __future__ import annotations

import weakref

from ..errors import ConfigError

_STACKS_WITH_NOTHING = {
    "memory": "block memory replaces the attention of every layer",
}
_ONE_PER_MODEL = {
    "kv": "one KV compression method per model: each decides what the same cache keeps",
}
# frozenset({a, b}) -> why they cannot share a model
_CMC = "cmc emulates matching over the full-length sequence; methods that remove or merge tokens break its row map"
_EXCLUSIVE: dict[frozenset, str] = {
    **{frozenset({"cmc", other}): _CMC for other in ("fastv", "simignore", "focus", "framefusion", "adaptiv")},
    frozenset({"focus", "framefusion"}): "both rewrite the visual tokens of the same early layers",
}

_attached: "weakref.WeakKeyDictionary[object, list[tuple[str, str]]]" = weakref.WeakKeyDictionary()


def attached_methods(key) -> list[str]:
    """Names of the methods attached to the decoder stack `key` (in the order they were applied)."""
    return [name for name, _ in _attached.get(key, [])]


def check(key, name: str, family: str) -> None:
    """Raise ConfigError (naming both methods) when `name` may not join the methods attached to `key`."""
    for other, other_family in _attached.get(key, []):
        reason = _conflict(name, family, other, other_family)
        if reason:
            raise ConfigError(f"{name} does not compose with {other}, which is already attached to this model "
                              f"({reason}); remove {other} first")


def _conflict(name: str, family: str, other: str, other_family: str) -> str | None:
    if name == other:
        return f"{name} may be applied once per model"
    for fam in (family, other_family):
        if fam in _STACKS_WITH_NOTHING:
            return _STACKS_WITH_NOTHING[fam]
    if family == other_family and family in _ONE_PER_MODEL:
        return _ONE_PER_MODEL[family]
    return _EXCLUSIVE.get(frozenset({name, other}))


def record(key, name: str, family: str) -> None:
    _attached.setdefault(key, []).append((name, family))


def forget(key, name: str) -> None:
    entries = _attached.get(key)
    if entries is None:
        return
    for i, (n, _) in enumerate(entries):
        if n == name:
            del entries[i]
            break
    if not entries:
        del _attached[key]
