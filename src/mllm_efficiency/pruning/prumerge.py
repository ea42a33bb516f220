"""PruMerge+ (Shang et al., arXiv 2403.15388): [CLS]-attention outliers plus uniform samples, merged with neighbours.

Per image, at the vision layer LLaVA reads, with a = the [CLS] query's attention over the N patches (averaged
over heads) and keep = round(N * (1 - ratio)) (static: the fast path can capture it):
1. outliers: the patches with a > Q3 + 1.5 * (Q3 - Q1) (quartiles by linear interpolation, numpy's default);
   if more than keep, the keep with the largest a;
2. uniform samples: the remaining m = keep - #outliers slots go to patches spread evenly over the non-outlier
   patches in raster order (rank r of the M non-outliers is taken when ceil(r*m/M) < ceil((r+1)*m/M): exactly
   m picks, evenly spaced);
3. merge: every kept patch p absorbs its k most similar pruned patches (cosine of the layer's keys, all heads
   concatenated; k is clamped to the number of pruned patches): x_p <- sum_q a_q x_q / sum_q a_q over p and its
   neighbours (the attention-weighted average). k defaults to the paper's 32 scaled to the tower's patch count,
   max(1, round(32 * N / 576)): 32 on LLaVA-1.5's 576 patches, 4 on 64 (an unscaled 32 on a 64-patch image
   would let every kept token absorb every pruned patch, blurring them all towards one average).
The LLM receives the keep merged tokens in raster order, at contiguous positions (`positions="renumber"`, the
paper) or each at its own patch's position (`positions="original"`: the other visual slots are removed at
layer 0). Spec: docs/vision_side.md.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int, check_ratio
from ..flops import visual_keep_count
from ..registry import register_method
from .vision_side import VisionSideMethod, check_positions

PAPER_K, PAPER_PATCHES = 32, 576  # the paper's neighbours per kept token on LLaVA-1.5's 24x24 patches


def default_k(num_patches: int) -> int:
    """The paper's k = 32 scaled to a tower of `num_patches` patches: max(1, round(32 * N / 576))."""
    return max(1, round(PAPER_K * num_patches / PAPER_PATCHES))


@dataclasses.dataclass(frozen=True)
class PruMergePlusConfig(MethodConfig):
    ratio: float = 0.75  # PruMerge+ keeps about a quarter of LLaVA-1.5's 576 tokens
    k: int | None = None  # pruned neighbours each kept token absorbs; None: default_k(N) (32 on 576 patches)
    positions: str = "renumber"  # "renumber": contiguous positions (the paper); "original": own patch positions
    allow_text_only: bool = False

    def validate(self) -> None:
        check_ratio("ratio", self.ratio)
        if self.k is not None:
            check_int("k", self.k, 0)
        check_positions("prumerge_plus", self.positions)


def prumerge_plus_select(attn: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool kept patches (exactly `keep` per row) and (B, N) bool IQR outliers. Device ops only."""
    B, N = attn.shape
    q1, q3 = torch.quantile(attn.float(), torch.tensor([0.25, 0.75], device=attn.device), dim=1)  # linear
    outlier = attn > (q3 + 1.5 * (q3 - q1)).unsqueeze(1)
    n_out = outlier.sum(1, keepdim=True)
    m = (keep - n_out).clamp_min(0)
    M = (N - n_out).clamp_min(1)
    r = (~outlier).long().cumsum(1) - 1  # raster rank among the non-outliers

    def ceil_div(a, b):
        return (a + b - 1).div(b, rounding_mode="floor")

    uniform = ~outlier & (ceil_div(r * m, M) < ceil_div((r + 1) * m, M))
    priority = torch.where(outlier, 2.0 + attn.float(), uniform.float())  # outliers by attention, then samples
    kept = torch.zeros(B, N, dtype=torch.bool, device=attn.device)
    kept.scatter_(1, priority.topk(keep, dim=1).indices, True)
    return kept, outlier


def prumerge_plus_compress(feats: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, keep: int, k: int,
                           positions: str = "renumber"):
    """feats (B, N, C), attn (B, N), keys (B, N, D) -> (fp32 features, (B, N) bool kept patches). The features
    hold the keep merged tokens first in raster order, then the pruned ones (positions="renumber"), or every
    merged token in its kept patch's slot and the pruned rows unchanged ("original")."""
    B, N, C = feats.shape
    kept, _ = prumerge_plus_select(attn, keep)
    idx = torch.arange(N, device=feats.device)
    order = torch.where(kept, idx, N + idx).argsort(dim=1)
    kpos = order[:, :keep]  # (B, keep) kept positions, ascending
    a = attn.float()
    W = torch.zeros(B, keep, N, device=feats.device)
    W.scatter_(2, kpos.unsqueeze(-1), a.gather(1, kpos).unsqueeze(-1))  # each kept token's own weight
    kk = min(k, N - keep)
    if kk:
        kn = torch.nn.functional.normalize(keys.float(), dim=-1)
        sim = kn.gather(1, kpos.unsqueeze(-1).expand(-1, -1, kn.shape[-1])) @ kn.transpose(1, 2)  # (B, keep, N)
        near = sim.masked_fill(kept.unsqueeze(1), float("-inf")).topk(kk, dim=-1).indices  # pruned neighbours
        W.scatter_(2, near, a.gather(1, near.flatten(1)).view(B, keep, kk))
    merged = (W @ feats.float()) / W.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if positions == "original":
        return feats.float().scatter(1, kpos.unsqueeze(-1).expand(-1, -1, C), merged), kept
    out = feats.float().gather(1, order.unsqueeze(-1).expand(-1, -1, C))
    return torch.cat([merged, out[:, keep:]], dim=1), kept


class AttachedPruMergePlus(VisionSideMethod):
    method_name = "prumerge_plus"

    def output_count(self, num_patches: int) -> int:
        k = self.config.k
        self.k = default_k(num_patches) if k is None else k  # clamped to the pruned count by the merge
        return visual_keep_count(num_patches, self.config.ratio)

    def compress(self, feats, attn, keys):
        return prumerge_plus_compress(feats, attn, keys, self.keep, self.k, self.config.positions)


@register_method("prumerge_plus", family="pruning", config_cls=PruMergePlusConfig,
                 summary="PruMerge+: per image, [CLS]-attention IQR outliers + uniform samples, each merged with "
                         "its nearest pruned patches (vision side, before the projector)")
def attach_prumerge_plus(model, adapter, config: PruMergePlusConfig) -> AttachedPruMergePlus:
    return AttachedPruMergePlus(model, adapter, config)
