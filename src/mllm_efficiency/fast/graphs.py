"""CUDA-graph helpers shared by the decode step and the prefill."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch


@contextlib.contextmanager
def side_stream(enabled: bool = True):
    """Run the block on a fresh side stream (what a capture's warm-up needs), ordered after and before the
    current stream's work."""
    if not enabled:
        yield
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def capture(fn: Callable[[], Any], warmup: int, rewind: Callable[[], None]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """`warmup` eager calls of `fn` on a side stream (allocator, cuBLAS handles and workspaces), then `fn`
    captured as a graph; `rewind()` undoes the calls' state changes before and after the capture (a capture runs
    no kernels, but host-side state must be as before). Returns (graph, fn's output tensors)."""
    with side_stream():
        for _ in range(warmup):
            fn()
    rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    rewind()
    return graph, out
