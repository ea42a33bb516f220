"""Models for benchmarks: random-weight models built on the device, and the unmodified model cut to a slice of
its decoder layers (the ideal cost of a pruned prefill's shape)."""
from __future__ import annotations

import contextlib

import torch


def build_random_model(model_cls, config, device, dtype: torch.dtype, seed: int):
    """`model_cls(config)` with random init (HF: normal std 0.02) built directly on `device` in `dtype`;
    latency and memory do not depend on weight values."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype)  # no-op for parameters; makes sure nothing stayed in another float type
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def sliced_layers(text_model, start: int, stop: int):
    """Temporarily keep only decoder layers [start, stop) (layer_idx of each layer is unchanged)."""
    original = text_model.layers
    text_model.layers = torch.nn.ModuleList(list(original)[start:stop])
    try:
        yield
    finally:
        text_model.layers = original


def ideal_pruned_shape(ttft, text_model, full_inputs, short_inputs, k: int, t_full_l, t_full_lp) -> dict:
    """Cost of a pruned prefill's shape on the unmodified model: layers[:k] on the full inputs plus layers[k:]
    on the short ones, minus one call with no layers (embeddings, RoPE table, norm, head: counted twice
    otherwise). `ttft(inputs)` returns a TimingResult; `interp_ms` interpolates full-model timings instead."""
    T = len(text_model.layers)
    with sliced_layers(text_model, 0, k):
        seg1 = ttft(full_inputs)
    with sliced_layers(text_model, k, T):
        seg2 = ttft(short_inputs)
    with sliced_layers(text_model, 0, 0):
        shell = ttft(short_inputs)
    interp = None
    if t_full_lp is not None:
        interp = k / T * t_full_l.median_ms + (T - k) / T * t_full_lp.median_ms
    return {"direct_ms": seg1.median_ms + seg2.median_ms - shell.median_ms,
            "segments_sum_ms": seg1.median_ms + seg2.median_ms,
            "first_k_layers_at_L": seg1.as_dict(), "last_layers_at_Lp": seg2.as_dict(),
            "shell_at_Lp": shell.as_dict(), "interp_ms": interp,
            "full_model_at_Lp": t_full_lp.as_dict() if t_full_lp is not None else None}
