"""`MemoryConfig`: the settings shared by the block-memory methods (docs/long_context_memory.md).

One frozen dataclass per method (subclasses below the shared base) so the registry keeps one config class per
name; the methods differ in `kind` (what the global stage sees and where queries are rotated) and defaults.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from ..config import MethodConfig, check_bool, check_choice, check_int, check_number
from ..errors import ConfigError

log = logging.getLogger("mllm_efficiency.memory")

CACHE_STRATEGIES = ("lru", "fifo", "lru-s")
KERNELS = ("auto", "torch", "flex")
OFFLOADS = ("cpu", "gpu")
QUESTION_SOURCES = ("auto", "span", "probe")
ON_MISSING = ("error", "infllm")


@dataclasses.dataclass(frozen=True)
class MemoryConfig(MethodConfig):
    n_init: int = 128
    n_local: int = 1024
    block_size: int = 128
    topk: int = 8
    repr_topk: int = 4
    max_cached_block: int = 32
    exc_block_size: int = 512
    cache_strategy: str = "lru"
    score_decay: float = 0.1
    question_weight: float = 1.0
    chunk_topk_calc: Optional[int] = None
    perhead: bool = False
    kernel: str = "auto"
    offload: str = "cpu"
    pin_memory: bool = False
    async_global_stream: bool = False
    base: Optional[float] = None
    distance_scale: Optional[float] = None
    question_source: str = "auto"
    on_missing_question: str = "error"

    # what the global stage holds: "blocks" (InfLLM / Q-LLM), "stream" or "infinite" (sinks only)
    kind = "blocks"
    query_aware = False

    def validate(self) -> None:
        check_int("n_init", self.n_init, 0)
        check_int("n_local", self.n_local, 1)
        check_int("block_size", self.block_size, 1)
        check_int("topk", self.topk, 1)
        check_int("repr_topk", self.repr_topk, 1, self.block_size)
        check_int("max_cached_block", self.max_cached_block, self.topk)
        check_int("exc_block_size", self.exc_block_size, 1, self.n_local)
        check_choice("cache_strategy", self.cache_strategy, CACHE_STRATEGIES)
        check_number("score_decay", self.score_decay, 0.0, 1.0, low_open=True)
        check_number("question_weight", self.question_weight, 0.0)
        if self.chunk_topk_calc is not None:
            check_int("chunk_topk_calc", self.chunk_topk_calc, self.exc_block_size)
            if self.chunk_topk_calc % self.exc_block_size:
                raise ConfigError(f"chunk_topk_calc must be a multiple of exc_block_size ({self.exc_block_size}), "
                                  f"got {self.chunk_topk_calc}")
        check_bool("perhead", self.perhead)
        if self.perhead:
            raise ConfigError("perhead=True (per-head block retrieval) is not implemented; allowed: false")
        check_choice("kernel", self.kernel, KERNELS)
        check_choice("offload", self.offload, OFFLOADS)
        check_bool("pin_memory", self.pin_memory)
        check_bool("async_global_stream", self.async_global_stream)
        if self.base is not None:
            check_number("base", self.base, 1.0, low_open=True)
        if self.distance_scale is not None:
            check_number("distance_scale", self.distance_scale, 0.0, low_open=True)
        check_choice("question_source", self.question_source, QUESTION_SOURCES)
        check_choice("on_missing_question", self.on_missing_question, ON_MISSING)


@dataclasses.dataclass(frozen=True)
class QLLMConfig(MemoryConfig):
    kind = "blocks"
    query_aware = True


@dataclasses.dataclass(frozen=True)
class InfLLMConfig(MemoryConfig):
    kind = "blocks"


@dataclasses.dataclass(frozen=True)
class StreamingMemoryConfig(MemoryConfig):
    kind = "stream"


@dataclasses.dataclass(frozen=True)
class LMInfiniteConfig(MemoryConfig):
    kind = "infinite"
