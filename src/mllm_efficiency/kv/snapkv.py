"""SnapKV (arXiv 2404.14469): the last `window` prompt tokens observe the prompt. Score of an earlier key =
its attention from the window rows (mean over rows and over the query heads of its KV head), pooled over
neighbouring positions; keep the window plus the top `keep - window` earlier keys, per KV head.
Defaults are the SnapKV repo's: window 32, avg pooling with kernel 5.
`head_adaptive=False` (EffiVLM-Bench's option): one kept set for all KV heads, scored by the mean over the KV
heads before pooling. `merge="pivot"` / `"average"` merges the evicted entries into the kept ones (kv.merge)."""
from __future__ import annotations

import dataclasses

import torch

from ..config import check_int
from ..core import attention_rows as R
from . import primitives as P
from .base import (
    KVConfig,
    LayerInput,
    Policy,
    Selection,
    check_parity_options,
    check_pooling,
)
from .merge import merge_fn
from .method import kv_method
from ..core.device import device_ints


@dataclasses.dataclass(frozen=True)
class SnapKVConfig(KVConfig):
    window: int = 32
    kernel_size: int = 5
    pooling: str = "avg"
    group_reduce: str = "mean"
    head_adaptive: bool = True
    merge: str = "none"

    def validate(self) -> None:
        super().validate()
        check_int("window", self.window, 0)
        check_pooling(self.pooling, self.kernel_size, self.group_reduce)
        check_parity_options(self)


def snap_scores(inp: LayerInput, cfg: SnapKVConfig, name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pooled window-attention scores (B, Hkv, S) ((B, 1, S) shared by the heads when `head_adaptive` is off;
    zero on the window and non-real slots), the window mask (B, S) and the window size per sample."""
    w = [P.window_size(cfg.window, k, name) for k in inp.keep]
    window = inp.window_mask(w)
    # at least one observation row, even when the protected window is empty (keep == 1)
    obs = P.last_real(inp.real, device_ints([max(x, 1) for x in w], inp.real.device))
    W = max(max(w), 1)
    S = inp.key.shape[2]
    score = R.window_scores(inp.query, inp.key, inp.mask, inp.scaling, obs[:, S - W:], cfg.group_reduce,
                            **inp.attn_kw)
    if not getattr(cfg, "head_adaptive", True):
        score = score.mean(1, keepdim=True)
    score = score.masked_fill(~(inp.real & ~window)[:, None], 0.0)
    return P.pool(score, cfg.pooling, cfg.kernel_size), window, w


@kv_method("snapkv", config=SnapKVConfig,
           summary="SnapKV: keep the keys the last prompt window attends to most (pooled), per KV head")
class SnapKVPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        score, window, _ = snap_scores(inp, self.config, self.name)
        return Selection(score, (inp.real & ~window)[:, None], window[:, None], inp.keep,
                         merge=merge_fn(self.config.merge))
