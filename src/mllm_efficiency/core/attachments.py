"""Attachment bookkeeping: which of the library's objects sit on a model, under which attribute, and the
forward's cache argument. The one place these names live; other packages import the accessors below
instead of spelling attribute names.

On the decoder stack (`adapter.text_model`): the pruning engine, the KV engine, the block-memory engine and
the shared `ModelContext`; on each attention module: the `AttentionHub` (and the memory engine). Every name
starts with `PREFIX`, which is what `core.rollback` snapshots and restores.
"""
from __future__ import annotations

import inspect
from typing import Any

PREFIX = "_mllm_eff"
PRUNING_ENGINE = PREFIX + "_pruning_engine"
KV_ENGINE = PREFIX + "_kv_engine"
MEMORY_ENGINE = PREFIX + "_memory_engine"
CONTEXT = PREFIX + "_context"
HUB = PREFIX + "_hub"


def attached(obj, name: str) -> Any:
    """What the library attached to `obj` under `name` (one of the constants above), or None."""
    return getattr(obj, name, None)


def attach(obj, name: str, value) -> None:
    setattr(obj, name, value)


def detach(obj, name: str, value=None) -> None:
    """Remove `name` from `obj` (only when it holds `value`, if given)."""
    if name in vars(obj) and (value is None or vars(obj)[name] is value):
        delattr(obj, name)


def own_attributes(obj) -> dict:
    """The library's attributes on `obj` (name -> value)."""
    return {k: v for k, v in vars(obj).items() if k.startswith(PREFIX)}


def pruning_engine(adapter):
    """The token-pruning engine attached to this model's decoder stack, or None."""
    return attached(adapter.text_model, PRUNING_ENGINE)


def kv_engine(adapter):
    """The KV-compression engine attached to this model's decoder stack, or None."""
    return attached(adapter.text_model, KV_ENGINE)


def memory_engine(adapter):
    """The block-memory engine attached to this model's decoder stack, or None."""
    return attached(adapter.text_model, MEMORY_ENGINE)


# ------------------------------------------------------------------------------------- the cache argument
def cache_kwarg(module) -> str:
    """The name of `module.forward`'s cache argument: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out, required: bool = False) -> Any:
    """The cache a forward returned, whichever name the installed transformers gives it; `cache` is read first
    (reading `past_key_values` warns from transformers 5.24). None if it returned none, unless `required`."""
    fields = getattr(out, "__dataclass_fields__", None) or {}
    for name in ("cache",) if "cache" in fields else ("cache", "past_key_values"):
        c = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
        if c is not None:
            return c
    if required:
        raise RuntimeError("the model returned no cache (use_cache=True)")
    return None
