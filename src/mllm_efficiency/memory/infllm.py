"""InfLLM: sinks + local window + top-k retrieved memory blocks, chunked prefill.

Algorithm: docs/long_context_memory.md; settings: `InfLLMConfig` (memory/config.py).
"""
from __future__ import annotations

from ..registry import register_method
from .config import InfLLMConfig
from .engine import MemoryEngine

__all__ = ["InfLLMConfig", "attach"]


@register_method("infllm", family="memory", config_cls=InfLLMConfig,
                 summary="InfLLM: sinks + local window + top-k retrieved memory blocks, chunked prefill")
def attach(model, adapter, config: InfLLMConfig) -> MemoryEngine:
    return MemoryEngine(model, adapter, "infllm", config)
