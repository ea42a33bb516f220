"""VL-Cache (arXiv 2410.23317): modality-aware scoring and sparsity-adaptive layer budgets.

Rows = the post-vision queries (prompt tokens after the last visual token; if there are none, the last
`fallback_rows` tokens, with a warning). Per layer l: sparsity `sp_l` = share of visible attention entries of
those rows below `sparsity_threshold * row max`. Budget fraction `f_l = (1 - ratio) * 0.9 * n * (1 - sp_l) /
sum_j (1 - sp_j)` clamped to [min_fraction, 1], blended with the uniform `(1 - ratio) * 0.9` by
`adaptive_mix`. Token score = attention summed over the rows (group mean). Keep a recent window of
`floor(window_fraction * (1 - ratio) * L)` tokens plus the top `floor(f_l * L)`. Needs every layer's
sparsity, so the cache is cropped after the whole prefill forward (prefill peak memory is unchanged).

`different_window_per_layer=True` (EffiVLM-Bench's `vlcache_different_window_per_layer`): the window is part of
each layer's own budget instead of a fixed share of the mean one. `f_l = (1 - ratio) * n * (1 - sp_l) /
sum_j (1 - sp_j)` clamped to [min_fraction / 0.9, 1] (blended with the uniform `1 - ratio` by `adaptive_mix`);
layer l keeps `floor(f_l * L)` tokens, of which the recent `floor(window_fraction * f_l * L)` are the window.
(EffiVLM-Bench keeps the window on top of `f_l * L`, 1.1 times the budget; here the budget holds.)
`head_adaptive=False`: one kept set for all KV heads (scores averaged over the KV heads). `merge="pivot"` /
`"average"` merges the evicted entries into the kept ones (kv.merge).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import check_bool, check_choice, check_fraction, check_int
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

SCORED_SHARE = 0.9  # of the kept budget; the rest is the recent window


@dataclasses.dataclass(frozen=True)
class VLCacheConfig(KVConfig):
    layer_adaptive: bool = True
    adaptive_mix: float = 1.0
    sparsity_threshold: float = 0.01
    window_fraction: float = 0.1
    min_fraction: float = 0.009
    fallback_rows: int = 32
    different_window_per_layer: bool = False
    head_adaptive: bool = True
    merge: str = "none"

    def validate(self) -> None:
        super().validate()
        check_fraction("adaptive_mix", self.adaptive_mix)
        check_fraction("sparsity_threshold", self.sparsity_threshold)
        check_fraction("window_fraction", self.window_fraction)
        check_fraction("min_fraction", self.min_fraction)
        check_int("fallback_rows", self.fallback_rows, 1)
        check_choice("layer_adaptive", self.layer_adaptive, (True, False))
        check_bool("different_window_per_layer", self.different_window_per_layer)
        check_parity_options(self)


@dataclasses.dataclass
class _Record:
    score: torch.Tensor  # (B, Hkv, S)
    sparse: torch.Tensor  # (B,) sparse visible entries
    visible: torch.Tensor  # (B,) visible entries


@kv_method("vlcache", config=VLCacheConfig,
           summary="VL-Cache: post-vision query scores with sparsity-adaptive layer budgets")
class VLCachePolicy(Policy):
    needs_visual = True
    layer_wise_post_pass = True

    def _rows(self, inp: LayerInput) -> torch.Tensor:
        """(B, S) bool: the query rows that score (post-vision, else the last `fallback_rows` real tokens)."""
        real, S = inp.real, inp.real.shape[1]
        idx = torch.arange(S, device=real.device)
        rows = torch.zeros_like(real)
        if inp.visual is not None:
            last_visual = torch.where(inp.visual & real, idx, -1).amax(1)
            rows = real & (idx[None, :] > last_visual[:, None]) & (last_visual[:, None] >= 0)
        missing = ~rows.any(1)
        if bool(missing.any()):
            P.warn_once("vlcache-rows", "vlcache: no text after the last visual token (or no visual tokens); "
                                        f"scoring with the last {self.config.fallback_rows} prompt tokens")
            fallback = P.last_real(real, torch.full((real.shape[0],), self.config.fallback_rows, device=real.device))
            rows = torch.where(missing[:, None], fallback, rows)
        return rows

    def record(self, inp: LayerInput) -> _Record:
        rows_ok = self._rows(inp)
        B, H, Lq, _ = inp.query.shape
        Hkv, S = inp.key.shape[1], inp.key.shape[2]
        first = int(torch.where(rows_ok, torch.arange(S, device=rows_ok.device), S).amin())
        score = torch.zeros(B, Hkv, H // Hkv, S, device=inp.key.device)
        sparse = torch.zeros(B, device=inp.key.device)
        visible = torch.zeros(B, device=inp.key.device)
        key = inp.key.float()
        for start in range(first, Lq, R.ROW_CHUNK):
            rows = torch.arange(start, min(start + R.ROW_CHUNK, Lq), device=key.device)
            probs = R.attention_rows(inp.query, key, inp.mask, rows, inp.scaling, **inp.attn_kw)
            w = rows_ok[:, rows]  # (B, r)
            vis = R.mask_bias(inp.mask, rows, Lq, S, (Hkv, H // Hkv), inp.key.device, inp.attn_kw.get("sliding_window"))
            vis = R.visible(vis) & w[:, None, None, :, None]
            small = probs < self.config.sparsity_threshold * probs.amax(-1, keepdim=True)
            sparse += (small & vis).flatten(1).sum(1)
            visible += vis.expand_as(probs).flatten(1).sum(1)
            score += (probs * w[:, None, None, :, None]).sum(3)
        return _Record(R.group_reduce(score), sparse, visible)

    def finish(self, records: dict) -> dict:
        cfg = self.config
        layers = sorted(records)
        n = len(layers)
        density = torch.stack([1 - records[i][1].sparse / records[i][1].visible.clamp_min(1) for i in layers])
        density = density.cpu().tolist()  # [layer][b]
        out, fractions = {}, []
        for li, i in enumerate(layers):
            inp, rec = records[i]
            keep, w, fr = [], [], []
            for b, L in enumerate(inp.lengths):
                total = sum(density[j][b] for j in range(n))
                f, k, wb = self._layer_budget(L, n, density[li][b], total)
                keep.append(k)
                w.append(wb)
                fr.append(f)
            fractions.append(fr)
            window = inp.window_mask(w)
            score = rec.score if cfg.head_adaptive else rec.score.mean(1, keepdim=True)
            out[i] = Selection(score, (inp.real & ~window)[:, None], window[:, None], keep,
                               merge=merge_fn(cfg.merge))
        self.stats.budget_fractions = fractions
        return out

    def _layer_budget(self, L: int, n: int, density: float, total: float) -> tuple[float, int, int]:
        """(f_l, tokens kept, window) of one layer and sample of length L."""
        cfg = self.config
        kept = cfg.kept_fraction(L)
        per_layer = cfg.different_window_per_layer
        uniform = kept if per_layer else kept * SCORED_SHARE
        f = uniform
        if cfg.layer_adaptive:
            f = uniform * n * density / total if total > 0 else uniform
            f = min(1.0, max(cfg.min_fraction / SCORED_SHARE if per_layer else cfg.min_fraction, f))
            f = (1 - cfg.adaptive_mix) * uniform + cfg.adaptive_mix * f
        if per_layer:
            k = max(1, min(L, math.floor(f * L)))
            window = math.floor(cfg.window_fraction * f * L)
        else:
            window = math.floor(cfg.window_fraction * kept * L)
            k = max(1, min(L, window + math.floor(f * L)))
        return f, k, min(window, k)
