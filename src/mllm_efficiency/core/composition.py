"""Which methods may be attached to one model together: the only place these rules live.

`apply` calls `check` before it touches the model, and `record` / `forget` keep the list of methods attached
to each decoder stack (keyed weakly, so nothing is stored on the model itself). The rules:
- every method appears at most once per model;
- a block-memory method replaces every layer's attention with its own: it stacks with nothing;
- one KV compression method per model (each decides what the same cache keeps);
- named pairs that break each other's assumptions are exclusive (`_EXCLUSIVE`), some only with the settings
  that break them (`_EXCLUSIVE_WHEN`).
Everything else stacks (e.g. FastV + SnapKV, SimIgnore + FastV, Focus + FastV); the pair matrix test
(tests/test_composition_matrix.py) runs every pair these rules allow.
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
_VISION_SIDE = ("the vision-side methods hand the LLM a shorter, reordered set of tokens per image at layer 0; "
                "{other} {why}")
_EXCLUSIVE: dict[frozenset, str] = {
    **{frozenset({"cmc", other}): _CMC for other in ("fastv", "random_prune", "simignore", "focus", "framefusion", "adaptiv",
                                                            "divprune", "dart", "pdrop", "visionzip",
                                                            "prumerge_plus", "sparsevlm")},
    frozenset({"visionzip", "prumerge_plus"}): "both rewrite the vision features the projector receives",
    **{frozenset({vision, other}): _VISION_SIDE.format(other=other, why=why)
       for vision in ("visionzip", "prumerge_plus")
       for other, why in (("divprune", "also removes visual tokens at the input of layer 0"),
                          ("simignore", "also removes or hides visual tokens at the input of layer 0"),
                          ("focus", "matches tokens on the full patch grid of each image"),
                          ("framefusion", "matches tokens on the full patch grid of each image"),
                          ("adaptiv", "matches neighbours on the full patch grid at layer 0"))},
    frozenset({"adaptiv", "divprune"}): "adaptiv matches neighbours on the full frame grid at layer 0; divprune "
                                        "removes visual tokens at the input of layer 0",
    frozenset({"focus", "framefusion"}): "both rewrite the visual tokens of the same early layers",
    frozenset({"dart", "focus"}): "focus fixes its kept set one layer ahead, over slots dart removes at the same "
                                  "layer",
    frozenset({"focus", "sparsevlm"}): "focus fixes its kept set one layer ahead, over slots sparsevlm removes or "
                                       "merges at the same layer",
}

_ADAPTIV = "adaptiv matches neighbours on the full frame grid at layer 0; {}"
# frozenset({a, b}) -> (broken(config of a by name), why); the pair is refused when `broken` holds
_EXCLUSIVE_WHEN: dict[frozenset, tuple] = {
    frozenset({"adaptiv", "simignore"}): (lambda c: c["simignore"].action == "drop",
                                          _ADAPTIV.format("simignore action='drop' removes tokens before it")),
    frozenset({"adaptiv", "fastv"}): (lambda c: c["fastv"].k == 0,
                                      _ADAPTIV.format("fastv k=0 removes tokens before it")),
    frozenset({"adaptiv", "random_prune"}): (lambda c: c["random_prune"].k == 0,
                                             _ADAPTIV.format("random_prune k=0 removes tokens before it")),
    **{frozenset({vision, other}): (lambda c, o=other: c[o].k == 0,
                                    _VISION_SIDE.format(other=other, why="with k=0 also removes visual tokens at "
                                                                         "the input of layer 0"))
       for vision in ("visionzip", "prumerge_plus") for other in ("fastv", "random_prune")},
}

_attached: "weakref.WeakKeyDictionary[object, list[tuple]]" = weakref.WeakKeyDictionary()


def attached_methods(key) -> list[str]:
    """Names of the methods attached to the decoder stack `key` (in the order they were applied)."""
    return [entry[0] for entry in _attached.get(key, [])]


def check(key, name: str, family: str, config) -> None:
    """Raise ConfigError (naming both methods) when `name` may not join the methods attached to `key`."""
    for other, other_family, other_config in _attached.get(key, []):
        reason = _conflict(name, family, config, other, other_family, other_config)
        if reason:
            raise ConfigError(f"{name} does not compose with {other}, which is already attached to this model "
                              f"({reason}); remove {other} first")


def _conflict(name: str, family: str, config, other: str, other_family: str, other_config) -> str | None:
    if name == other:
        return f"{name} may be applied once per model"
    for fam in (family, other_family):
        if fam in _STACKS_WITH_NOTHING:
            return _STACKS_WITH_NOTHING[fam]
    if family == other_family and family in _ONE_PER_MODEL:
        return _ONE_PER_MODEL[family]
    pair = frozenset({name, other})
    if pair in _EXCLUSIVE:
        return _EXCLUSIVE[pair]
    if pair in _EXCLUSIVE_WHEN:
        broken, reason = _EXCLUSIVE_WHEN[pair]
        if broken({name: config, other: other_config}):
            return reason
    return None


def record(key, name: str, family: str, config) -> None:
    _attached.setdefault(key, []).append((name, family, config))


def forget(key, name: str) -> None:
    entries = _attached.get(key)
    if entries is None:
        return
    for i, entry in enumerate(entries):
        if entry[0] == name:
            del entries[i]
            break
    if not entries:
        del _attached[key]
