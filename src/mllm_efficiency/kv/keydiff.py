"""KeyDiff (Park et al., 2025, arXiv 2504.15364; kvpress `KeyDiffPress`): keep the keys least similar to
their head's anchor. Anchor = mean of the L2-normalised keys of the KV head (over the sample's real prompt
tokens); score = -cos(k, anchor); keep the top `keep` per KV head. No attention is needed (the model stays
on SDPA / FlashAttention, and the scores need no query). Optional `window`: the last `window` prompt tokens
are always kept (0 by default, as kvpress)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import check_int
from . import primitives as P
from .base import KVConfig, LayerInput, Policy, Selection
from .method import kv_method


@dataclasses.dataclass(frozen=True)
class KeyDiffConfig(KVConfig):
    window: int = 0

    def validate(self) -> None:
        super().validate()
        check_int("window", self.window, 0)


def keydiff_scores(key: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """-cos(k_j, anchor) per KV head, anchor = mean over real slots of k / |k|: (B, Hkv, S) fp32."""
    k = key.float()
    w = real[:, None, :, None].float()  # (B, 1, S, 1)
    anchor = (F.normalize(k, dim=-1) * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)
    return -F.cosine_similarity(k, anchor, dim=-1)


@kv_method("keydiff", config=KeyDiffConfig,
           summary="KeyDiff: keep the keys least similar (cosine) to their head's mean key (no attention)")
class KeyDiffPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        window = inp.window_mask([P.window_size(self.config.window, k, self.name) for k in inp.keep])
        score = keydiff_scores(inp.key, inp.real)
        return Selection(score, (inp.real & ~window)[:, None], window[:, None], inp.keep)
