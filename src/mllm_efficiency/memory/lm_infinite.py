"""LM-Infinite: local window + sinks at a fixed distance n_local - 1 (Lambda mask with a distance ceiling).

Algorithm: docs/long_context_memory.md; settings: `LMInfiniteConfig` (memory/config.py).
"""
from __future__ import annotations

from ..registry import register_method
from .config import LMInfiniteConfig
from .engine import MemoryEngine

__all__ = ["LMInfiniteConfig", "attach"]


@register_method("lm_infinite", family="memory", config_cls=LMInfiniteConfig,
                 summary="LM-Infinite: local window + sinks at a fixed distance n_local - 1 (Lambda mask with a distance ceiling)")
def attach(model, adapter, config: LMInfiniteConfig) -> MemoryEngine:
    return MemoryEngine(model, adapter, "lm_infinite", config)
