"""Bytes a decode step must read, and the device bandwidth they are read at: the decode roofline.

A decode step reads every weight once (all parameters but the input embedding table, of which one row per token
is read) and every stored key and value once, so its time is at least (weight bytes + KV bytes) / bandwidth.
"""
from __future__ import annotations

import time

import torch

from .timing import synchronize, time_cuda

__all__ = ["measure_bandwidth", "weight_bytes", "weight_bytes_read", "kv_bytes", "stored_lengths", "roofline_ms"]


def measure_bandwidth(device, mib: int | None = None, repeats: int = 10) -> dict:
    """Achieved memory bandwidth from a large device-to-device copy: (read + write bytes) / median time.

    Also a read-only reduction over the same buffer; `bytes_per_s` is the larger of the two (what a decode step,
    mostly reads, can reach). Buffer: `mib` MiB (default 2048 on CUDA, 64 on CPU)."""
    device = torch.device(device)
    if mib is None:
        mib = 2048 if device.type == "cuda" else 64
    n = max(1, mib * (1 << 20) // 4)
    x = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    nbytes = n * 4
    t_copy = time_cuda(lambda: y.copy_(x), warmup=2, repeats=repeats, device=device)
    t_read = time_cuda(lambda: x.sum(), warmup=2, repeats=repeats, device=device)
    del x, y
    copy_bw = 2 * nbytes / (t_copy.median_ms / 1e3)
    read_bw = nbytes / (t_read.median_ms / 1e3)
    return {"buffer_bytes": nbytes, "copy_ms": t_copy.median_ms, "read_ms": t_read.median_ms,
            "copy_bytes_per_s": copy_bw, "read_bytes_per_s": read_bw, "bytes_per_s": max(copy_bw, read_bw),
            "clock": t_copy.clock}


def weight_bytes(model) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def weight_bytes_read(model, text_only: bool = True) -> int:
    """Parameter bytes one decode step reads: the text decoder and LM head, minus the input embedding table
    (one row is read) unless it is tied to the LM head. `text_only=False` counts every parameter (vision
    tower included, which a decode step does not run)."""
    from ..adapters import get_adapter

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    if text_only:
        adapter = get_adapter(model)
        params = {id(p): p for p in adapter.text_model.parameters()}
        if head is not None:
            params[id(head.weight)] = head.weight
        total = sum(p.numel() * p.element_size() for p in params.values())
    else:
        total = weight_bytes(model)
    if not tied:
        total -= (emb.numel() - emb.shape[1]) * emb.element_size()
    return int(total)


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__} (needs .layers)")
    return layers


def kv_bytes(cache) -> int:
    """Keys + values bytes stored over all layers of a transformers Cache."""
    total = 0
    for layer in _layers(cache):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                total += t.numel() * t.element_size()
    return total


def stored_lengths(cache) -> list[int]:
    """Stored tokens per layer (the keys' sequence axis)."""
    return [int(layer.keys.shape[-2]) if isinstance(getattr(layer, "keys", None), torch.Tensor) else 0
            for layer in _layers(cache)]


def roofline_ms(weight_bytes_read_: float, kv_bytes_: float, bytes_per_s: float) -> float:
    """Lower bound of one decode step in ms: (weights + KV) bytes / bandwidth."""
    return (weight_bytes_read_ + kv_bytes_) / bytes_per_s * 1e3


def host_launch_us(device, n: int = 2000) -> float:
    """Host cost of issuing one tiny op (a kernel launch on CUDA), back to back without synchronising."""
    z = torch.zeros(16, device=device)
    for _ in range(100):
        z.add_(1.0)
    synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        z.add_(1.0)
    us = (time.perf_counter() - t) / n * 1e6
    synchronize(device)
    return us
