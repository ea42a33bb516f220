"""Ada-KV (arXiv 2407.11550): head-adaptive budgets on top of SnapKV (or PyramidKV) scores. Per layer the
scored budget `Hkv * b` (`b = keep - w`) is shared by the KV heads; every head also keeps the window.

* `allocation="kvpress"` (default; kvpress's AdaKVPress): each head first takes its own top
  `floor(alpha * b)` tokens (safeguard), the rest of the budget goes to the highest remaining (head, position)
  scores of the layer. The heads sum to exactly `Hkv * b`.
* `allocation="adakv"` (the authors' code, FFY0/AdaKV, as copied into KVCache-Factory's `AdaKVCluster`):
  `c_h` = how many of the layer's global top `Hkv * b` (head, position) scores fall in head h; head h keeps
  its own top `round((1 - alpha) * c_h + floor(alpha * b))` tokens (round half to even, as `torch.round`).
  The heads sum to about `Hkv * b` (rounding).

Heads then store different numbers of slots: the layer's physical length is the largest head's count and
shorter heads are padded with invalid filler slots that attention never sees (stats report the logical and
the physical size). `beta`, `infeasible` and `schedule` only apply with `base="pyramidkv"`."""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import check_choice, check_fraction
from ..errors import ConfigError
from .base import LayerInput, Policy, Selection
from .merge import merge_fn
from .method import kv_method
from .pyramidkv import PyramidKVConfig, layer_keep
from .snapkv import snap_scores

_PYRAMID_ONLY = ("beta", "infeasible", "schedule")


@dataclasses.dataclass(frozen=True)
class AdaKVConfig(PyramidKVConfig):
    alpha: float = 0.2
    base: str = "snapkv"
    allocation: str = "kvpress"

    def validate(self) -> None:
        super().validate()
        check_fraction("alpha", self.alpha)
        check_choice("base", self.base, ("snapkv", "pyramidkv"))
        check_choice("allocation", self.allocation, ("kvpress", "adakv"))
        if self.base == "snapkv":
            fields = {f.name: f.default for f in dataclasses.fields(PyramidKVConfig)}
            changed = [n for n in _PYRAMID_ONLY if getattr(self, n) != fields[n]]
            if changed:
                raise ConfigError(f"adakv: {', '.join(changed)} only apply with base='pyramidkv' (PyramidKV layer "
                                  "budgets); with base='snapkv' every layer keeps the same budget")
        if self.head_adaptive is not True:
            raise ConfigError("adakv: head_adaptive=False is not available: Ada-KV's budgets are per KV head "
                              "(use snapkv or pyramidkv with head_adaptive=False)")


def head_counts(score: torch.Tensor, candidate: torch.Tensor, budgets: list[int], alpha: float) -> list[list[int]]:
    """kvpress rule. Scored tokens per KV head: (B, Hkv) counts whose sum per sample is Hkv * budget_b.
    Ties go to the earlier position within a head and to the lower head across heads."""
    B, Hkv, S = score.shape
    s = score.double().masked_fill(~candidate, float("-inf"))
    ranked = torch.sort(s, dim=-1, descending=True, stable=True).values  # (B, Hkv, S)
    out = []
    for b in range(B):
        safe = math.floor(alpha * budgets[b])
        rest = ranked[b].clone()
        rest[:, :safe] = float("-inf")
        extra = Hkv * (budgets[b] - safe)
        order = torch.sort(rest.flatten(), descending=True, stable=True).indices[:extra]
        picked = torch.bincount(order // S, minlength=Hkv)
        out.append([safe + c for c in picked.tolist()])
    return out


def original_head_counts(score: torch.Tensor, candidate: torch.Tensor, budgets: list[int],
                         alpha: float) -> list[list[int]]:
    """Ada-KV authors' rule: `round((1 - alpha) * c_h + floor(alpha * b))`, `c_h` = head h's share of the
    layer's global top `Hkv * b` scores (ties to the lower head, then the earlier position)."""
    B, Hkv, S = score.shape
    s = score.double().masked_fill(~candidate, float("-inf"))
    available = candidate.sum(-1).tolist()  # (B, Hkv) scored slots each head can keep
    out = []
    for b in range(B):
        floor_cap = math.floor(alpha * budgets[b])
        order = torch.sort(s[b].flatten(), descending=True, stable=True).indices[:Hkv * budgets[b]]
        c = torch.bincount(order // S, minlength=Hkv).double()
        cap = torch.round(c * (1 - alpha) + floor_cap).long().tolist()
        out.append([min(x, a) for x, a in zip(cap, available[b])])
    return out


@kv_method("adakv", config=AdaKVConfig,
           summary="Ada-KV: SnapKV/PyramidKV scores with budgets shared across KV heads (ragged heads)")
class AdaKVPolicy(Policy):
    def check_model(self, adapter) -> None:
        if "flash" in (adapter.text_config._attn_implementation or ""):
            raise ConfigError("adakv stores a different number of slots per KV head, which needs a per-head mask: "
                              "use attn_implementation 'sdpa' or 'eager' (flash attention takes key-padding masks only)")

    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        score, window, w = snap_scores(inp, cfg, self.name)
        keep = layer_keep(inp, cfg, w) if cfg.base == "pyramidkv" else inp.keep
        candidate = (inp.real & ~window)[:, None].expand_as(score)
        rule = original_head_counts if cfg.allocation == "adakv" else head_counts
        counts = rule(score, candidate, [k - wb for k, wb in zip(keep, w)], cfg.alpha)
        per_head = [[c + wb for c in row] for row, wb in zip(counts, w)]
        return Selection(score, candidate, window[:, None], per_head, merge=merge_fn(cfg.merge))
