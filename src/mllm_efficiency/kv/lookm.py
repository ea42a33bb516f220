"""LOOK-M (arXiv 2406.18139): text-prior eviction with merging of the evicted KV.

Score = column sums over every prompt query (group mean). Text prior: every text token ranks above every
visual token (an exact two-level order; the seed's "-10000 on visual scores" equals it only while column
sums stay below 10000). Keep the recent `floor(recent_fraction * keep)` tokens plus the top rest.
`merge="pivot"`: each evicted token of a head joins the kept token whose key is most cosine-similar (keys as
stored, post-RoPE); a kept key/value becomes the mean of itself and the tokens that joined it.
`"same_modality"` only merges text into text and visual into visual; `"none"` only evicts.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..config import check_choice
from ..registry import register_method
from . import primitives as P
from .base import AttachedKV, KVConfig, LayerInput, Policy, Selection, check_fraction

MERGE_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class LookMConfig(KVConfig):
    recent_fraction: float = 0.1
    merge: str = "pivot"
    text_prior: bool = True
    group_reduce: str = "mean"

    def validate(self) -> None:
        super().validate()
        check_fraction("recent_fraction", self.recent_fraction)
        check_choice("merge", self.merge, ("pivot", "same_modality", "none"))
        check_choice("text_prior", self.text_prior, (True, False))
        check_choice("group_reduce", self.group_reduce, ("mean", "max"))


def pivot_merge(inp: LayerInput, idx: torch.Tensor, valid: torch.Tensor, same_modality: bool):
    """Keys and values (B, Hkv, K, D) of the kept slots `idx` after merging every evicted real slot into its
    most similar kept key (cosine, per KV head)."""
    key, value = inp.key, inp.value
    B, Hkv, S, D = key.shape
    idx = idx.expand(B, Hkv, -1)
    valid = valid.expand(B, Hkv, -1)
    K = idx.shape[-1]
    kept_k = key.gather(2, idx[..., None].expand(-1, -1, -1, D)).float()
    kept_v = value.gather(2, idx[..., None].expand(-1, -1, -1, value.shape[-1])).float()
    kept = torch.zeros(B, Hkv, S, dtype=torch.bool, device=key.device).scatter(2, idx, valid)
    evicted = inp.real[:, None] & ~kept
    pivots = F.normalize(kept_k, dim=-1)
    kept_visual = None
    if same_modality and inp.visual is not None:
        kept_visual = inp.visual.gather(1, idx.reshape(B, -1)).view(B, Hkv, K)
    sum_k, sum_v = torch.zeros_like(kept_k), torch.zeros_like(kept_v)
    count = torch.zeros(B, Hkv, K, device=key.device)
    for start in range(0, S, MERGE_CHUNK):
        sl = slice(start, min(start + MERGE_CHUNK, S))
        k_e = key[:, :, sl].float()
        sim = F.normalize(k_e, dim=-1) @ pivots.transpose(-1, -2)  # (B, Hkv, c, K)
        allowed = valid[:, :, None, :]
        if kept_visual is not None:
            allowed = allowed & (inp.visual[:, None, sl, None] == kept_visual[:, :, None, :])
        best_sim, best = sim.masked_fill(~allowed, float("-inf")).max(-1)
        w = (evicted[:, :, sl] & (best_sim > float("-inf"))).float()
        count.scatter_add_(2, best, w)
        sum_k.scatter_add_(2, best[..., None].expand(-1, -1, -1, D), k_e * w[..., None])
        v_e = value[:, :, sl].float()
        sum_v.scatter_add_(2, best[..., None].expand(-1, -1, -1, v_e.shape[-1]), v_e * w[..., None])
    denom = (1 + count)[..., None]
    return ((kept_k + sum_k) / denom).to(key.dtype), ((kept_v + sum_v) / denom).to(value.dtype)


class LookMPolicy(Policy):
    needs_visual = True

    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        score = P.column_sums(inp.query, inp.key, inp.mask, inp.scaling, row_ok=inp.real, group=cfg.group_reduce,
                              **inp.attn_kw).double()
        if cfg.text_prior and inp.visual is not None:
            # column sums are at most the number of rows, so this offset puts every text token first
            score = score + (~inp.visual).double()[:, None] * (inp.query.shape[2] + 1)
        recent = inp.window_mask([math.floor(cfg.recent_fraction * k) for k in inp.keep])
        merge = None
        if cfg.merge != "none":
            same = cfg.merge == "same_modality"
            merge = lambda i, idx, valid: pivot_merge(i, idx, valid, same)  # noqa: E731
        return Selection(score, (inp.real & ~recent)[:, None], recent[:, None], inp.keep, merge=merge)


@register_method("lookm", family="kv", config_cls=LookMConfig,
                 summary="LOOK-M: text-prior eviction by accumulated attention, evicted KV merged into kept KV")
def attach_lookm(model, adapter, config: LookMConfig) -> AttachedKV:
    return AttachedKV(model, adapter, LookMPolicy("lookm", config))
