"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): a few dominant patches plus a few merged contextual tokens.

Per image, at the vision layer LLaVA reads (vision_feature_layer), with a = the [CLS] query's attention over the
N patches (averaged over heads; the ranking equals the paper's sum over heads):
1. dominant: the `dominant` patches with the largest a (kept unchanged);
2. contextual: the R = N - dominant other patches, in raster order, give `contextual` targets at ranks
   0, s, 2s, ... (s = max(1, R // contextual)); every other remaining patch joins the target whose key is most
   similar (cosine of the layer's keys averaged over heads); each group (its target and its members) is
   averaged into one token.
The LLM receives dominant tokens (raster order) then contextual tokens (target order): dominant + contextual
tokens per image, at contiguous positions (`positions="renumber"`, the paper); with `positions="original"` each
dominant token keeps its patch's position id and each contextual token its target's (the other visual slots are
removed at layer 0), so the tokens come in raster order of their source slots. Budget: `dominant` and `contextual` when both are given; else keep = round(N * (1 - ratio)) split
like the paper's LLaVA-1.5 settings (54+10 = 64, 108+20 = 128, 162+30 = 192): contextual = round(keep * 5 / 32),
dominant = keep - contextual (one of the two may be given with a ratio; the other is the rest). No budget at all:
ratio = 1 - 64/576 (64 tokens of LLaVA-1.5's 576). Spec: docs/vision_side.md.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int, check_ratio
from ..errors import ConfigError
from ..flops import visual_keep_count
from ..registry import register_method
from .vision_side import VisionSideMethod, check_budget, check_positions

DEFAULT_RATIO = 1.0 - 64 / 576  # the paper's most compressed LLaVA-1.5 setting: 54 dominant + 10 contextual


@dataclasses.dataclass(frozen=True)
class VisionZipConfig(MethodConfig):
    ratio: float | None = None
    dominant: int | None = None
    contextual: int | None = None
    positions: str = "renumber"  # "renumber": contiguous positions (the paper); "original": source slots' positions
    allow_text_only: bool = False

    def validate(self) -> None:
        check_positions("visionzip", self.positions)
        if self.ratio is not None:
            check_ratio("ratio", self.ratio)
        if self.dominant is not None:
            check_int("dominant", self.dominant, 0)
        if self.contextual is not None:
            check_int("contextual", self.contextual, 0)
        if self.dominant is not None and self.contextual is not None:
            if self.dominant + self.contextual == 0:
                raise ConfigError("visionzip: dominant + contextual must be >= 1 (tokens kept per image), got 0 + 0")
        elif (self.dominant is None) != (self.contextual is None) and self.ratio is None:
            given = "dominant" if self.dominant is not None else "contextual"
            raise ConfigError(f"visionzip: {given} alone does not fix the budget: give both dominant and "
                              "contextual, or a ratio (the other one is then the rest of round(N * (1 - ratio)))")

    def split(self, num_patches: int) -> tuple[int, int]:
        """(dominant, contextual) per image of `num_patches` patches."""
        N = num_patches
        if self.dominant is not None and self.contextual is not None:
            check_budget("visionzip", "dominant + contextual", self.dominant + self.contextual, N)
            return self.dominant, self.contextual
        keep = visual_keep_count(N, DEFAULT_RATIO if self.ratio is None else self.ratio)
        if self.dominant is not None or self.contextual is not None:
            given, name = (self.dominant, "dominant") if self.dominant is not None else (self.contextual, "contextual")
            if given > keep:
                raise ConfigError(f"visionzip: {name} = {given} exceeds the {keep} tokens ratio={self.ratio} keeps "
                                  f"of {N} patches: allowed [0, {keep}]")
            return (given, keep - given) if name == "dominant" else (keep - given, given)
        contextual = round(keep * 5 / 32)
        return keep - contextual, contextual


def visionzip_compress(feats: torch.Tensor, attn: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int,
                       heads: int, positions: str = "renumber") -> tuple[torch.Tensor, torch.Tensor]:
    """feats (B, N, C), attn (B, N) [CLS] attention, keys (B, N, D) patch keys (heads concatenated) ->
    (fp32 features, (B, N) bool: dominant patches and targets, the output tokens' source slots). The features
    are reordered for positions="renumber" (the `dominant` tokens in raster order, the `contextual` merged tokens
    in target order, then the untouched rest); for "original" every row stays in its slot, each target's row
    replaced by its group's mean. Device ops only."""
    B, N, C = feats.shape
    d, c = dominant, contextual
    idx = torch.arange(N, device=feats.device)
    dom = torch.zeros(B, N, dtype=torch.bool, device=feats.device)
    if d:
        dom.scatter_(1, attn.topk(d, dim=1).indices, True)
    rest = ~dom
    target = torch.zeros_like(dom)
    if c:
        step = max(1, (N - d) // c)
        rank = rest.long().cumsum(1) - 1  # raster rank among the remaining patches
        target = rest & (rank % step == 0) & (rank // step < c)
    order = torch.where(dom, idx, torch.where(target, N + idx, 2 * N + idx)).argsort(dim=1)
    out = feats.float()
    if c:
        tpos = order[:, d:d + c]  # (B, c) target positions, ascending
        metric = torch.nn.functional.normalize(keys.float().view(B, N, heads, -1).mean(2), dim=-1)
        tmetric = metric.gather(1, tpos.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
        assign = tpos.gather(1, (metric @ tmetric.transpose(1, 2)).argmax(-1))  # (B, N) most similar target
        assign = torch.where(target, idx, assign)
        w = rest.float()
        sums = torch.zeros_like(out).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, C), out * w.unsqueeze(-1))
        count = torch.zeros_like(w).scatter_add_(1, assign, w)
        out = torch.where(target.unsqueeze(-1), sums / count.clamp_min(1).unsqueeze(-1), out)
    if positions == "original":
        return out, dom | target
    return out.gather(1, order.unsqueeze(-1).expand(-1, -1, C)), dom | target


class AttachedVisionZip(VisionSideMethod):
    method_name = "visionzip"

    def output_count(self, num_patches: int) -> int:
        self.dominant, self.contextual = self.config.split(num_patches)
        return self.dominant + self.contextual

    def compress(self, feats, attn, keys):
        return visionzip_compress(feats, attn, keys, self.dominant, self.contextual, self.heads,
                                  self.config.positions)


@register_method("visionzip", family="pruning", config_cls=VisionZipConfig,
                 summary="VisionZip: per image, top-[CLS]-attention dominant patches + merged contextual tokens "
                         "(vision side, before the projector)")
def attach_visionzip(model, adapter, config: VisionZipConfig) -> AttachedVisionZip:
    return AttachedVisionZip(model, adapter, config)
