"""Q-LLM (QuickLLaMA): InfLLM block memory with a query-aware retrieval term (question_weight).

Algorithm: docs/long_context_memory.md; settings: `QLLMConfig` (memory/config.py).
"""
from __future__ import annotations

from ..registry import register_method
from .config import QLLMConfig
from .engine import MemoryEngine

__all__ = ["QLLMConfig", "attach"]


@register_method("qllm", family="memory", config_cls=QLLMConfig,
                 summary="Q-LLM (QuickLLaMA): InfLLM block memory with a query-aware retrieval term (question_weight)")
def attach(model, adapter, config: QLLMConfig) -> MemoryEngine:
    return MemoryEngine(model, adapter, "qllm", config)
