"""StreamingLLM, memory variant: sinks + local window in prefill and decoding (sinks just before the window).

Algorithm: docs/long_context_memory.md; settings: `StreamingMemoryConfig` (memory/config.py).
"""
from __future__ import annotations

from ..registry import register_method
from .config import StreamingMemoryConfig
from .engine import MemoryEngine

__all__ = ["StreamingMemoryConfig", "attach"]


@register_method("streamingllm_memory", family="memory", config_cls=StreamingMemoryConfig,
                 summary="StreamingLLM, memory variant: sinks + local window in prefill and decoding (sinks just before the window)")
def attach(model, adapter, config: StreamingMemoryConfig) -> MemoryEngine:
    return MemoryEngine(model, adapter, "streamingllm_memory", config)
