"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep the most diverse visual tokens, text-agnostic.

At the LLM input (the projector's output, before layer 0) each sample's N visual embeddings give the cosine
distance matrix D = 1 - cos(e_i, e_j). The kept set S of size keep(N, R) approximately maximises the Max-Min
Diversity objective min_{i != j in S} D_ij, greedily (farthest-point order, the paper's Algorithm 1):
- first: the token whose nearest neighbour is farthest (argmax_i min_{j != i} D_ij);
- then, repeatedly: the token farthest from the set chosen so far (argmax_i min_{s in S} D_is), i not in S.
Ties go to the lowest position (argmax's first maximum). The other visual tokens are removed before layer 0
(every layer saves compute). All visual tokens of a sample form one pool (several images: one joint selection).
Spec: docs/token_pruning.md.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_ratio
from ..flops import visual_keep_count
from ..registry import register_method
from .engine import AttachedStep, PruningStats, RatioStep, Request, StepResult
from .simignore import _true_positions


@dataclasses.dataclass(frozen=True)
class DivPruneConfig(MethodConfig):
    ratio: float = 0.902  # the paper's main LLaVA-1.5 setting keeps 9.8% of the tokens (its threshold_ratio 0.098)
    allow_text_only: bool = False

    def validate(self) -> None:
        check_ratio("ratio", self.ratio)


def max_min_diverse(features: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool (N,): the `keep` rows of `features` (N, d) chosen greedily for max-min cosine diversity.
    Device-side only (no host synchronisation): safe inside a CUDA-graph capture."""
    N = features.shape[0]
    out = torch.zeros(N, dtype=torch.bool, device=features.device)
    if keep <= 0:
        return out
    if keep >= N:
        return out.fill_(True)
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.T
    eye = torch.eye(N, dtype=torch.bool, device=features.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(0)  # each token's nearest-neighbour distance
    # indices stay 1-element device tensors (indexing with a 0-d tensor would read it on the host)
    nxt = nearest.argmax().view(1)
    closest = torch.full((N,), float("inf"), device=features.device)  # distance of every token to the chosen set
    for _ in range(keep):
        out.index_fill_(0, nxt, True)
        closest = torch.minimum(closest, dist.index_select(0, nxt)[0])
        nxt = closest.masked_fill(out, float("-inf")).argmax().view(1)
    return out


class DivPruneStep(RatioStep):
    score_layer = None

    def __init__(self, config: DivPruneConfig):
        self.config = config
        self.layer = 0
        self.mode = "inplace"
        self.stats = PruningStats()
        self._keep: list[int] = []
        # host numbers: the prompt's visual counts (read once by the engine through HostValues); the greedy
        # loop runs on the device
        self.graph_capture = True
        self.method_name = "divprune"

    def select(self, req: Request, hidden: torch.Tensor) -> StepResult:
        visual = req.present_visual()
        counts = list(req.visual_counts)
        keep = torch.ones_like(visual)
        kept_vis = torch.zeros_like(visual)
        targets = [min(visual_keep_count(n, self.config.ratio), c) for n, c in zip(req.prompt_visual_counts, counts)]
        for b in range(hidden.shape[0]):
            if counts[b] == 0:
                continue
            pos = _true_positions(visual[b], counts[b])
            chosen = max_min_diverse(hidden[b, pos], targets[b])
            keep[b, pos] = chosen
            kept_vis[b, pos] = chosen
        self._keep = targets
        return self.result(req, counts, targets, keep, kept_vis)


class AttachedDivPrune(AttachedStep):
    def __init__(self, model, adapter, config: DivPruneConfig):
        self.attach_step(model, adapter, DivPruneStep(config))


@register_method("divprune", family="pruning", config_cls=DivPruneConfig,
                 summary="DivPrune: keep the max-min diverse visual tokens (cosine, LLM input), drop the rest")
def attach_divprune(model, adapter, config: DivPruneConfig) -> AttachedDivPrune:
    return AttachedDivPrune(model, adapter, config)
