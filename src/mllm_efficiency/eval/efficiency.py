"""Per-sample efficiency numbers measured during an ordinary `generate()` call.

* prefill ms: from the prompt handed to the streamer to the first generated token (vision tower + LLM prefill)
* decode tokens/s: generated tokens after the first / time after the first token
* kept tokens: prompt tokens the LLM's later layers saw (FastV-style pruning), else the prompt length
* KV bytes / KV tokens: what the cache holds at the end, summed over layers (keys + values)
* theoretical prefill FLOPs of the language model (mllm_efficiency.flops), with pruning where a method prunes
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from ..bench.timing import synchronize
from ..core.attachments import output_cache


class StepClock:
    """A `generate(streamer=...)` object that only timestamps: the first `put` is the prompt, the second the
    first new token."""

    def __init__(self, device: Any = None):
        self.device = device
        self.times: list[float] = []

    def put(self, value) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter())

    @property
    def prefill_ms(self) -> float | None:
        return (self.times[1] - self.times[0]) * 1e3 if len(self.times) >= 2 else None

    def decode_tokens_per_s(self, new_tokens: int) -> float | None:
        if len(self.times) < 3 or new_tokens < 2:
            return None
        span = self.times[-1] - self.times[1]
        return (new_tokens - 1) / span if span > 0 else None


@dataclasses.dataclass
class SampleEfficiency:
    prefill_ms: float | None
    decode_tokens_per_s: float | None
    generated_tokens: int
    prompt_tokens: int
    visual_tokens: int
    kept_tokens: int
    kv_tokens: float | None
    kv_bytes: int | None
    prefill_tflops: float | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def cache_size(cache, row: int | None = None) -> tuple[float | None, int | None]:
    """(mean stored tokens per layer, bytes of keys + values) of a transformers Cache, or (None, None).
    With `row`, only that batch row's slots are counted (a batched cache holds every sample's KV)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None, None
    lengths, total = [], 0
    for layer in layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            return None, None
        lengths.append(k.shape[-2])
        if row is not None and k.dim() == 4:
            k, v = k[row], v[row]
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return sum(lengths) / len(lengths), total


def slot_kv(plan, row: int, new_tokens: int) -> tuple[float, int]:
    """(mean stored tokens per layer, KV bytes of batch row `row`) of the fast path's cache (`plan`: the
    `ShapePlan` that ran, `mllm_efficiency.fast.session_for(model).last_plan`) at the end of a generation: the
    prompt slots each layer kept plus the generated tokens."""
    tokens, total = [], 0
    for layer in plan.cache.layers:
        n = layer.stored + new_tokens
        per_slot = layer.keys[row, :, :1].numel() * layer.keys.element_size() * 2
        tokens.append(n)
        total += n * per_slot
    return sum(tokens) / len(tokens), total


def kept_prompt_tokens(handles, prompt_tokens: int, row: int = 0) -> tuple[int, int | None, int | None]:
    """(tokens kept after pruning, pruning layer k, visual tokens) of sample `row` from pruning methods' stats."""
    kept, layer = prompt_tokens, None
    visual = None
    for h in handles:
        st = getattr(h, "stats", None)
        num_visual, keep = getattr(st, "num_visual", None), getattr(st, "keep_count", None)
        if num_visual and keep and row < len(num_visual) and row < len(keep):
            kept -= num_visual[row] - keep[row]
            visual = num_visual[row] if visual is None else visual
            k = getattr(h.config, "k", None)
            layer = k if layer is None else min(layer, k if k is not None else layer)
    return kept, layer, visual


def prefill_tflops(model, prompt_tokens: int, kept: int, k: int | None) -> float | None:
    from ..flops import LayerShape, exact_prefill_flops

    try:
        shape = LayerShape.from_config(model.config)
        if k is None or kept == prompt_tokens:
            return exact_prefill_flops(shape, prompt_tokens) / 1e12
        return exact_prefill_flops(shape, prompt_tokens, min(k, shape.num_layers - 1), kept) / 1e12
    except Exception:  # informative only: unknown config layouts give no FLOPs rather than a failed evaluation
        return None


def measure(model, handles, clock: StepClock, output, prompt_tokens: int, visual_tokens: int,
            generated_tokens: int, row: int = 0, kv: tuple[float, int] | None = None) -> SampleEfficiency:
    """`kv`: (stored tokens per layer, bytes) when the cache is not `output`'s (the fast path's slot buffers)."""
    kept, layer, _ = kept_prompt_tokens(handles, prompt_tokens, row)
    kv_tokens, kv_bytes = kv if kv is not None else cache_size(output_cache(output), row)
    return SampleEfficiency(
        prefill_ms=clock.prefill_ms, decode_tokens_per_s=clock.decode_tokens_per_s(generated_tokens),
        generated_tokens=generated_tokens, prompt_tokens=prompt_tokens, visual_tokens=visual_tokens,
        kept_tokens=kept, kv_tokens=kv_tokens, kv_bytes=kv_bytes,
        prefill_tflops=prefill_tflops(model, prompt_tokens, kept, layer))


def summarize(rows: list[dict]) -> dict:
    """Means over samples of every numeric field (None values skipped)."""
    out: dict[str, Any] = {"samples": len(rows)}
    if not rows:
        return out
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if vals:
            out[f"mean_{key}"] = sum(vals) / len(vals)
    return out
