"""LOOK-M (arXiv 2406.18139): text-prior eviction with merging of the evicted KV.

Score = column sums over every prompt query (group mean). Text prior: every text token ranks above every
visual token (an exact two-level order; the seed's "-10000 on visual scores" equals it only while column
sums stay below 10000). Keep the recent `floor(recent_fraction * keep)` tokens plus the top rest.
With `hh_ratio` and `recent_ratio` (LOOK-M's and EffiVLM-Bench's options of those names) the budget is set
by them instead: `max(1, floor(hh_ratio * L))` scored tokens plus the recent `max(1, floor(recent_ratio * L))`.

Merging (kv.merge): each evicted token of a head joins the kept token whose key is most cosine-similar (keys
as stored, post-RoPE). `merge="pivot"` (LOOK-M's pivotal merging, every public LOOK-M code path):
`k' = (k + sum_i (p_i + k) / 2) / (1 + n)`, values alike; `"average"` (LOOK-M's averaged merging):
`k' = (k + sum_i p_i) / (1 + n)`; `"same_modality"` is pivotal merging of text into text and visual into
visual only (EffiVLM-Bench's `update_kv_only_merge_visual`), or `merge_scope="same_modality"` with any
merge; `"none"` only evicts.
"""
from __future__ import annotations

import dataclasses
import math

from ..config import check_choice, check_fraction
from ..errors import ConfigError
from ..core import attention_rows as R
from .base import KVConfig, LayerInput, Policy, Selection
from .merge import merge_fn
from .method import kv_method

DEFAULT_RECENT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class LookMConfig(KVConfig):
    recent_fraction: float = DEFAULT_RECENT_FRACTION
    merge: str = "pivot"
    merge_scope: str = "all"
    text_prior: bool = True
    group_reduce: str = "mean"
    hh_ratio: float | None = None
    recent_ratio: float | None = None

    def validate(self) -> None:
        super().validate()
        check_fraction("recent_fraction", self.recent_fraction)
        check_choice("merge", self.merge, ("pivot", "average", "same_modality", "none"))
        check_choice("merge_scope", self.merge_scope, ("all", "same_modality"))
        check_choice("text_prior", self.text_prior, (True, False))
        check_choice("group_reduce", self.group_reduce, ("mean", "max"))
        if self.merge in ("none", "same_modality") and self.merge_scope != "all":
            raise ConfigError(f"merge_scope has no effect with merge={self.merge!r}: leave it at 'all'")
        if (self.hh_ratio is None) != (self.recent_ratio is None):
            raise ConfigError("hh_ratio and recent_ratio go together (LOOK-M's heavy-hitter and recent shares of "
                              "the prompt): give both or neither")
        if self.hh_ratio is not None:
            check_fraction("hh_ratio", self.hh_ratio, 0.0, 1.0, low_open=True)
            check_fraction("recent_ratio", self.recent_ratio, 0.0, 1.0, low_open=True)
            given = [n for n in ("ratio", "budget_tokens", "budgets") if getattr(self, n) is not None]
            if self.recent_fraction != DEFAULT_RECENT_FRACTION:
                given.append("recent_fraction")
            if given:
                raise ConfigError(f"hh_ratio / recent_ratio set the budget; {', '.join(given)} cannot be given "
                                  "with them")

    def split(self, length: int) -> tuple[int, int]:
        """(scored, recent) token counts of the hh_ratio / recent_ratio mode for a prompt of `length`."""
        return (max(1, math.floor(length * self.hh_ratio)), max(1, math.floor(length * self.recent_ratio)))

    def keep(self, length: int) -> int:
        if self.hh_ratio is None:
            return super().keep(length)
        return min(length, sum(self.split(length))) if length > 0 else 0

    def describe(self) -> str:
        if self.hh_ratio is None:
            return super().describe()
        return f"keeping {self.hh_ratio:.0%} heavy hitters + {self.recent_ratio:.0%} recent prompt tokens"


@kv_method("lookm", config=LookMConfig,
           summary="LOOK-M: text-prior eviction by accumulated attention, evicted KV merged into kept KV")
class LookMPolicy(Policy):
    needs_visual = True

    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        score = R.column_sums(inp.query, inp.key, inp.mask, inp.scaling, row_ok=inp.real, group=cfg.group_reduce,
                              **inp.attn_kw).double()
        if cfg.text_prior and inp.visual is not None:
            # column sums are at most the number of rows, so this offset puts every text token first
            score = score + (~inp.visual).double()[:, None] * (inp.query.shape[2] + 1)
        if cfg.hh_ratio is None:
            counts = [math.floor(cfg.recent_fraction * k) for k in inp.keep]
        else:
            counts = [min(cfg.split(n)[1], k) for n, k in zip(inp.lengths, inp.keep)]
        recent = inp.window_mask(counts)
        how, same = cfg.merge, cfg.merge_scope == "same_modality"
        if how == "same_modality":
            how, same = "pivot", True
        return Selection(score, (inp.real & ~recent)[:, None], recent[:, None], inp.keep, merge=merge_fn(how, same))
