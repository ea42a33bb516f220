"""Small host lists as device tensors, safe inside a CUDA-graph capture.

`torch.tensor(list, device="cuda")` copies from pageable host memory and synchronises, which a stream
capture forbids. While a capture is in progress the values are written by fill kernels instead (they are
constants of the captured prefill: host values only ever depend on the graph cache's key).
"""
from __future__ import annotations

import torch


def device_ints(values, device, dtype=torch.long) -> torch.Tensor:
    """A 1-D (list of ints) or 2-D (list of equal-length lists) tensor on `device`."""
    device = torch.device(device)
    if not _capturing(device):
        return torch.tensor(values, dtype=dtype, device=device)
    nested = bool(values) and isinstance(values[0], (list, tuple))
    flat = [v for row in values for v in row] if nested else list(values)
    if len(set(flat)) <= 1:
        out = torch.full((len(flat),), flat[0] if flat else 0, dtype=dtype, device=device)
    else:
        out = torch.empty(len(flat), dtype=dtype, device=device)
        for i, v in enumerate(flat):
            out[i] = v
    return out.view(len(values), -1) if nested else out


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
