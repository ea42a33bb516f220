"""Benchmark helpers (timing, peak memory, markdown tables). The full `mllm-eff bench` harness builds on these."""
from .timing import (MemoryResult, TimingResult, environment_info, markdown_table, peak_memory, percentile,
                     synchronize, time_cuda, uses_cuda)

__all__ = ["TimingResult", "MemoryResult", "time_cuda", "peak_memory", "percentile", "markdown_table",
           "environment_info", "synchronize", "uses_cuda"]
