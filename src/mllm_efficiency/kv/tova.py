"""TOVA (Oren et al., 2024, arXiv 2401.06104, "Transformers are Multi-State RNNs"): keep the tokens the
current query attends to most. At prefill, score every prompt key by the attention of the last prompt token,
averaged over all the layer's attention heads (the paper's layer-wise policy: one kept set shared by every KV
head); keep the top `keep`. `decode="current"` is the paper's decode-time eviction: at every step the new
token's attention (same head average) replaces the scores, and the lowest-scoring token is evicted once the
layer is over its budget. No protected window (kvpress's TOVAPress protects the last token; the paper does
not). `head_adaptive=True`: score per KV head (mean over its query heads) and keep a set per KV head."""
from __future__ import annotations

import dataclasses

import torch

from ..config import check_bool
from ..core import attention_rows as R
from .base import KVConfig, LayerInput, Policy, Selection
from .method import kv_method


@dataclasses.dataclass(frozen=True)
class TOVAConfig(KVConfig):
    head_adaptive: bool = False

    decode_modes = ("none", "current")

    def validate(self) -> None:
        super().validate()
        check_bool("head_adaptive", self.head_adaptive)


def last_row_scores(query, key, mask, scaling, attn_kw, head_adaptive: bool) -> torch.Tensor:
    """Attention of the last query row, mean over the query heads: (B, 1, Lk), or (B, Hkv, Lk) per KV head."""
    rows = torch.arange(query.shape[2] - 1, query.shape[2], device=query.device)
    probs = R.attention_rows(query, key, mask, rows, scaling, **attn_kw)[:, :, :, 0]  # (B, Hkv, G, Lk)
    if head_adaptive:
        return probs.mean(2)
    return probs.flatten(1, 2).mean(1, keepdim=True)


@kv_method("tova", config=TOVAConfig,
           summary="TOVA: keep the tokens the current (last) query attends to most, heads averaged "
                   "(decode='current' evicts every step)")
class TOVAPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        score = last_row_scores(inp.query, inp.key, inp.mask, inp.scaling, inp.attn_kw, cfg.head_adaptive)
        none = torch.zeros_like(inp.real)[:, None]
        return Selection(score, inp.real[:, None], none, inp.keep,
                         decode_score=score if cfg.decode == "current" else None)

    def decode_update(self, layer, query, key, mask, scaling, attn_kw) -> None:
        if self.config.decode == "current":
            layer.score = last_row_scores(query, key, mask, scaling, attn_kw, self.config.head_adaptive)

    def decode_scores(self, layer, real):
        return layer.score, torch.zeros_like(real)
