"""Ada-KV (arXiv 2407.11550): head-adaptive budgets on top of SnapKV (or PyramidKV) scores. Per layer the
scored budget `Hkv * (keep - w)` is shared by the KV heads: each head first takes its own top
`floor(alpha * (keep - w))` tokens (safeguard), the rest of the budget goes to the highest remaining
(head, position) scores of the layer. Every head also keeps the window. Heads then store different numbers of
slots: the layer's physical length is the largest head's count and shorter heads are padded with invalid
filler slots that attention never sees (stats report the logical and the physical size)."""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import check_choice
from ..errors import ConfigError
from ..registry import register_method
from .base import AttachedKV, LayerInput, Policy, Selection, check_fraction
from .pyramidkv import PyramidKVConfig, layer_keep
from .snapkv import snap_scores


@dataclasses.dataclass(frozen=True)
class AdaKVConfig(PyramidKVConfig):
    alpha: float = 0.2
    base: str = "snapkv"

    def validate(self) -> None:
        super().validate()
        check_fraction("alpha", self.alpha)
        check_choice("base", self.base, ("snapkv", "pyramidkv"))


def head_counts(score: torch.Tensor, candidate: torch.Tensor, budgets: list[int], alpha: float) -> list[list[int]]:
    """Scored tokens per KV head: (B, Hkv) counts whose sum per sample is Hkv * budget_b.
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


class AdaKVPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        score, window, w = snap_scores(inp, cfg, self.name)
        keep = layer_keep(inp, cfg, w) if cfg.base == "pyramidkv" else inp.keep
        candidate = (inp.real & ~window)[:, None].expand_as(score)
        counts = head_counts(score, candidate, [k - wb for k, wb in zip(keep, w)], cfg.alpha)
        per_head = [[c + wb for c in row] for row, wb in zip(counts, w)]
        return Selection(score, candidate, window[:, None], per_head)


@register_method("adakv", family="kv", config_cls=AdaKVConfig,
                 summary="Ada-KV: SnapKV/PyramidKV scores with budgets shared across KV heads (ragged heads)")
def attach_adakv(model, adapter, config: AdaKVConfig) -> AttachedKV:
    if "flash" in (adapter.text_config._attn_implementation or ""):
        raise ConfigError("adakv stores a different number of slots per KV head, which needs a per-head mask: "
                          "use attn_implementation 'sdpa' or 'eager' (flash attention takes key-padding masks only)")
    return AttachedKV(model, adapter, AdaKVPolicy("adakv", config))
