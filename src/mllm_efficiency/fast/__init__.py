"""The fast generate path: graph-captured prefill + CUDA-graph decode on static slot buffers.

`generate` (also `mllm_efficiency.generate`) is the entry point; `FastSession` keeps one model's graphs and
buffers between calls, `release(model)` frees them; `FastDecoder` is the lower-level decoder used by the
benchmarks."""
from .decode import FastDecoder
from .generate import generate
from .session import FastSession, release, session_for

__all__ = ["FastDecoder", "FastSession", "generate", "release", "session_for"]
