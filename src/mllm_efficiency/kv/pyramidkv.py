"""PyramidKV (arXiv 2406.02069): SnapKV scores and window, with layer budgets falling linearly from the first
to the last layer. Non-window base `b = keep - w`, `n` layers, `L` cached tokens.

`schedule="exact"` (default): `min_b = b / beta`, `max_b = 2b - min_b`; layer l gets
`max_b - l (max_b - min_b) / (n - 1)` scored tokens plus the window, rounded by largest remainder so the
layers sum to exactly `n * b`. When `max_b > L - w` the pyramid does not fit:
* `infeasible="uniform"` keeps `keep` in every layer (this library's own fallback; no upstream code does
  exactly this);
* `infeasible="cap"` sets `max_b = L - w` and `min_b = 2b - max_b`, the capping step both KVCache-Factory
  and kvpress apply (kvpress then falls back to uniform when `min_b < w`, and rounds each layer on its own;
  KVCache-Factory uses integer steps, see below: neither matches "cap" exactly).

`schedule="kvcache_factory"` reproduces KVCache-Factory's `PyramidKVCluster` (also EffiVLM-Bench's copy)
exactly: `min_b = b // beta`, `max_b = 2b - min_b`; if `max_b >= L - w` then `max_b = L - w`,
`min_b = 2b - max_b`; `steps = (max_b - min_b) // (n - 1)` and layer l keeps `max_b - l * steps` scored
tokens, except that every layer keeps the uniform `b` when `L < 2b`. Integer steps: the layers sum to at most
`n * b`. `infeasible` has no effect there (a non-default value is refused).

Each layer computes the pyramid from its own cached length (after token pruning lengths may differ by
layer; the exact sum then holds among layers of equal length)."""
from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from ..config import check_choice, check_fraction
from ..errors import ConfigError
from .base import LayerInput, Policy, Selection
from .merge import merge_fn
from .method import kv_method
from .snapkv import SnapKVConfig, snap_scores

SCHEDULES = ("exact", "kvcache_factory")


@dataclasses.dataclass(frozen=True)
class PyramidKVConfig(SnapKVConfig):
    beta: float = 20.0
    infeasible: str = "uniform"
    schedule: str = "exact"

    def validate(self) -> None:
        super().validate()
        check_fraction("beta", self.beta, 1.0, float("inf"))
        check_choice("infeasible", self.infeasible, ("uniform", "cap"))
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.schedule == "kvcache_factory" and self.infeasible != "uniform":
            raise ConfigError("infeasible has no effect with schedule='kvcache_factory' (KVCache-Factory caps "
                              "max_b at L - w itself); leave infeasible at its default 'uniform'")


def kvcache_factory_budgets(num_layers: int, base: int, window: int, length: int, beta: float) -> list[int]:
    """KVCache-Factory's PyramidKV schedule: scored (non-window) tokens per layer."""
    n = num_layers
    if length < 2 * base:
        return [base] * n
    min_b = int(base // beta)
    max_b = 2 * base - min_b
    if max_b >= length - window:
        max_b = length - window
        min_b = 2 * base - max_b
    steps = (max_b - min_b) // (n - 1) if n > 1 else 0
    return [max_b - l * steps for l in range(n)]


def pyramid_budgets(num_layers: int, base: int, window: int, length: int, beta: float,
                    infeasible: str = "uniform", schedule: str = "exact") -> list[int]:
    """Scored (non-window) tokens per layer; with the exact schedule they sum to `num_layers * base`."""
    if schedule == "kvcache_factory":
        return kvcache_factory_budgets(num_layers, base, window, length, beta)
    n = num_layers
    min_b = Fraction(base) / Fraction(beta)
    max_b = 2 * base - min_b
    if max_b > length - window:
        if infeasible == "uniform":
            return [base] * n
        max_b = Fraction(length - window)
        min_b = 2 * base - max_b
    if n == 1:
        return [base]
    exact = [max_b - l * (max_b - min_b) / (n - 1) for l in range(n)]
    out = [math.floor(x) for x in exact]
    order = sorted(range(n), key=lambda l: (-(exact[l] - out[l]), l))
    for l in order[:n * base - sum(out)]:
        out[l] += 1
    return out


def layer_keep(inp: LayerInput, cfg: PyramidKVConfig, w: list[int]) -> list[int]:
    return [pyramid_budgets(inp.num_layers, k - wb, wb, n, cfg.beta, cfg.infeasible, cfg.schedule)[inp.layer] + wb
            for k, wb, n in zip(inp.keep, w, inp.lengths)]


@kv_method("pyramidkv", config=PyramidKVConfig,
           summary="PyramidKV: SnapKV scoring with budgets decreasing linearly over layers")
class PyramidKVPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        score, window, w = snap_scores(inp, self.config, self.name)
        return Selection(score, (inp.real & ~window)[:, None], window[:, None], layer_keep(inp, self.config, w),
                         merge=merge_fn(self.config.merge))
