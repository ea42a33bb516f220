"""H2O (arXiv 2306.14048): heavy hitters by accumulated attention. Score of a key = the sum of the attention
every prompt query gives it (column sums, group mean over the query heads of a KV head). Keep the recent
`floor(keep * recent_fraction)` tokens plus the top-scoring earlier ones. `decode="accumulate"` keeps adding
each new query's attention to the scores and evicts the lowest non-recent token once the cache exceeds
its budget (the paper's decode-time H2O). `head_adaptive=False` (EffiVLM-Bench): one kept set for all KV heads,
scored by the mean over the KV heads. `merge="pivot"` / `"average"` merges evicted entries (kv.merge)."""
from __future__ import annotations

import dataclasses
import math

import torch.nn.functional as F

from ..config import check_choice, check_fraction
from ..core import attention_rows as R
from . import primitives as P
from .base import (
    KVConfig,
    LayerInput,
    Policy,
    Selection,
    check_parity_options,
)
from .merge import merge_fn
from .method import kv_method
from ..core.device import device_ints


@dataclasses.dataclass(frozen=True)
class H2OConfig(KVConfig):
    recent_fraction: float = 0.5
    group_reduce: str = "mean"
    head_adaptive: bool = True
    merge: str = "none"

    decode_modes = ("none", "accumulate")

    def validate(self) -> None:
        super().validate()
        check_fraction("recent_fraction", self.recent_fraction)
        check_choice("group_reduce", self.group_reduce, ("mean", "max"))
        check_parity_options(self)


@kv_method("h2o", config=H2OConfig,
           summary="H2O: heavy hitters by accumulated attention + recent window (decode='accumulate')")
class H2OPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        score = R.column_sums(inp.query, inp.key, inp.mask, inp.scaling, row_ok=inp.real, group=cfg.group_reduce,
                              **inp.attn_kw)
        if not cfg.head_adaptive:
            score = score.mean(1, keepdim=True)
        recent = inp.window_mask([math.floor(k * cfg.recent_fraction) for k in inp.keep])
        decode_score = score if cfg.decode == "accumulate" else None
        return Selection(score, (inp.real & ~recent)[:, None], recent[:, None], inp.keep, decode_score=decode_score,
                         merge=merge_fn(cfg.merge))

    def decode_update(self, layer, query, key, mask, scaling, attn_kw) -> None:
        if self.config.decode != "accumulate" or layer.score is None:
            return
        new = R.column_sums(query, key, mask, scaling, group=self.config.group_reduce, **attn_kw)
        if not self.config.head_adaptive:
            new = new.mean(1, keepdim=True)
        old = layer.score
        layer.score = F.pad(old, (0, new.shape[-1] - old.shape[-1])) + new

    def decode_scores(self, layer, real):
        recent = [math.floor(b * self.config.recent_fraction) for b in layer.budget]
        score = layer.score
        return score, P.last_real(real, device_ints(recent, real.device))
