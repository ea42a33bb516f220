"""DART (Wen et al., 2025, arXiv 2502.11494, "Stop looking for important tokens ...: duplication matters more").

At the input of decoder layer K (default 2) the visual tokens that duplicate a few *pivot* tokens are removed:
1. pivots: the `pivot_image_token` visual tokens and the `pivot_text_token` text tokens (those after the last
   visual token: the question) whose keys at layer K-1 have the largest L1 norm (post-RoPE keys of all heads,
   as the authors' code takes them);
2. the hidden states entering layer K, passed through the model's final norm (as the authors' code does), are
   compared by cosine similarity: for each pivot in turn (ascending position), the `quota` visual tokens still
   unclaimed that are *least* similar to it are kept and leave the pool;
3. kept = the image pivots + the tokens claimed by the pivots; the text pivots are only raters.
Keep count: keep(N, R) = clamp(round(N * (1 - R)), 1, N). The authors' code gives every pivot
floor(keep / P) tokens (P = number of pivots), so it keeps about keep; here the keep - (image pivots) tokens
are split exactly (floor, the first pivots take one more), so the count is exact. Image pivots beyond `keep`
are not taken (the strongest `keep` ones are); with no pivot at all (pivot_image_token=0 and no question
tokens) the strongest visual token is the one pivot. No attention probabilities are needed: any kernel works.
Spec: docs/token_pruning.md.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int, check_ratio
from ..core.context import ModelContext
from ..errors import ConfigError
from ..flops import visual_keep_count
from ..registry import register_method
from .engine import AttachedStep, PruningStats, RatioStep, Request, StepResult


@dataclasses.dataclass(frozen=True)
class DARTConfig(MethodConfig):
    k: int = 2  # the paper's K (the authors' code: pruned_layer)
    ratio: float = 0.778  # the authors' reduction_ratio: 576 -> 128 visual tokens on LLaVA-1.5
    pivot_image_token: int = 4
    pivot_text_token: int = 4
    allow_text_only: bool = False

    def validate(self) -> None:
        check_int("k", self.k, 1)
        check_ratio("ratio", self.ratio)
        check_int("pivot_image_token", self.pivot_image_token, 0)
        check_int("pivot_text_token", self.pivot_text_token, 0)
        if self.pivot_image_token + self.pivot_text_token == 0:
            raise ConfigError("dart needs at least one pivot: pivot_image_token + pivot_text_token >= 1")


def pivot_quotas(remaining: int, pivots: int) -> list[int]:
    """Tokens each pivot claims: `remaining` split as evenly as possible, the first pivots take the extra."""
    if pivots == 0:
        return []
    base, extra = divmod(remaining, pivots)
    return [base + (1 if i < extra else 0) for i in range(pivots)]


def dart_select(states: torch.Tensor, visual: torch.Tensor, pivots: torch.Tensor, image_pivots: torch.Tensor,
                quotas: list[int]) -> torch.Tensor:
    """Bool (L,): kept visual tokens. `states` (L, d) normed hidden states, `visual` (L,) bool, `pivots` (P,)
    positions in processing order, `image_pivots` (p,) positions kept outright, `quotas` (P,) host ints."""
    x = torch.nn.functional.normalize(states.float(), dim=-1)
    chosen = torch.zeros_like(visual)
    chosen.index_fill_(0, image_pivots, True)
    pool = visual & ~chosen
    for i, q in enumerate(quotas):
        if q == 0:
            continue
        sim = x @ x.index_select(0, pivots[i:i + 1])[0]
        sim = sim.masked_fill(~pool, float("inf"))
        least = torch.sort(sim, stable=True).indices[:q]
        chosen.index_fill_(0, least, True)
        pool.index_fill_(0, least, False)
    return chosen


class DARTStep(RatioStep):
    def __init__(self, config: DARTConfig, norm: torch.nn.Module):
        self.config = config
        self.layer = config.k
        self.score_layer = config.k - 1
        self.mode = "inplace"
        self.norm = norm
        self.stats = PruningStats()
        self._keep: list[int] = []
        # host numbers: visual counts and the number of question tokens (prompt layout, through HostValues)
        self.graph_capture = True
        self.method_name = "dart"
        self.host_values = None

    def score(self, req: Request, module, query, key, attention_mask, kwargs) -> torch.Tensor:
        return key.float().abs().sum(dim=(1, 3))  # (B, Lk): L1 norm of each key over every head

    def _host_read(self, name: str, compute):
        return self.host_values.read(name, compute) if self.host_values is not None else compute()

    def select(self, req: Request, hidden: torch.Tensor) -> StepResult:
        cfg = self.config
        visual = req.present_visual()
        B, Lcur = visual.shape
        norms = req.take_scores(self, "DART")
        idx = torch.arange(Lcur, device=visual.device)
        last = torch.where(visual, idx, -1).amax(1, keepdim=True)
        text = req.valid & ~visual & (idx.unsqueeze(0) > last)
        n_text = self._host_read("dart_text_tokens", lambda: text.sum(1).tolist())
        counts = list(req.visual_counts)
        targets = [min(visual_keep_count(n, cfg.ratio), c) for n, c in zip(req.prompt_visual_counts, counts)]
        states = self.norm.forward(hidden)  # .forward: the engine's hook on the final norm must not run here
        keep = torch.ones_like(visual)
        kept_vis = torch.zeros_like(visual)
        for b in range(B):
            if counts[b] == 0:
                continue
            p_img = min(cfg.pivot_image_token, targets[b])
            p_txt = min(cfg.pivot_text_token, n_text[b])
            if p_img + p_txt == 0:  # no image pivots asked for and no question tokens: one image pivot
                p_img = 1
            img_piv = torch.sort(norms[b].masked_fill(~visual[b], float("-inf")), descending=True,
                                 stable=True).indices[:p_img]
            txt_piv = torch.sort(norms[b].masked_fill(~text[b], float("-inf")), descending=True,
                                 stable=True).indices[:p_txt]
            pivots = torch.sort(torch.cat([img_piv, txt_piv])).values
            chosen = dart_select(states[b], visual[b], pivots, img_piv, pivot_quotas(targets[b] - p_img, p_img + p_txt))
            keep[b] = ~visual[b] | chosen
            kept_vis[b] = chosen
        return self.result(req, counts, targets, keep, kept_vis)


class AttachedDART(AttachedStep):
    def __init__(self, model, adapter, config: DARTConfig):
        T = adapter.num_layers
        if config.k >= T:
            raise ConfigError(f"dart: k must be in [1, {T - 1}] for this model ({T} decoder layers), got {config.k}")
        self.attach_step(model, adapter, DARTStep(config, adapter.text_model.norm))
        self.step.host_values = ModelContext.of(adapter).host_values


@register_method("dart", family="pruning", config_cls=DARTConfig,
                 summary="DART: at layer K keep the visual tokens least similar to a few pivot tokens (no attention)")
def attach_dart(model, adapter, config: DARTConfig) -> AttachedDART:
    return AttachedDART(model, adapter, config)
