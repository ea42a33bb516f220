"""What every benchmark script shares: random-weight models built on the device, JSON-safe results, outputs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

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


def jsonable(x: Any) -> Any:
    """Tensors to lists, NaN/inf to None, keys to strings (recursively)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def write_outputs(result: dict, markdown: str, json_path: str | None, markdown_path: str | None) -> None:
    for path, text in ((json_path, json.dumps(jsonable(result), indent=1)), (markdown_path, markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            print(f"wrote {path}", file=sys.stderr)
