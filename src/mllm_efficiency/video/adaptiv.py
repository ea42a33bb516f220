"""AdapTiV (MICRO 2024), as the Focus repository re-implements it for LLMs (docs/video.md): once, at
layer 0 before attention (prefill), each visual token is compared with its top and left neighbours in the
same frame by sign similarity `(#equal signs - #different signs) / dim`; a token whose best similarity is
>= `threshold` is dropped without averaging. Row 0, column 0 and the first frame of a multi-frame input are
never dropped. Runs as a K = 0 prune on the pruning engine: a real speedup."""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int, check_similarity
from ..pruning.engine import PruningEngine, StepResult
from ..registry import register_method
from .common import DelegateStep, PromptLayout, current_visual


@dataclasses.dataclass(frozen=True)
class AdapTiVConfig(MethodConfig):
    threshold: float = 0.6
    frames: int | None = None
    allow_text_only: bool = False

    def validate(self) -> None:
        check_similarity("threshold", self.threshold, "sign similarity")
        if self.frames is not None:
            check_int("frames", self.frames, 1)


@dataclasses.dataclass
class AdapTiVStats:
    num_visual: list[int] = dataclasses.field(default_factory=list)
    dropped: list[int] = dataclasses.field(default_factory=list)
    cache_lengths: list[int] | None = None
    prefills: int = 0

    @property
    def token_sparsity(self) -> float:
        n = sum(self.num_visual)
        return sum(self.dropped) / n if n else 0.0


def sign_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(#equal signs - #different signs) / dim along the last axis (sign = x >= 0)."""
    equal = ((a >= 0) == (b >= 0)).float().mean(-1)
    return 2 * equal - 1


def grid_drop_mask(x: torch.Tensor, frames: int, height: int, width: int, threshold: float) -> torch.Tensor:
    """Bool (frames*height*width,): tokens of one grid (rows in grid order) that AdapTiV drops."""
    g = x.view(frames, height, width, -1)
    best = torch.full((frames, height, width), -2.0, device=x.device)
    best[:, 1:, :] = sign_similarity(g[:, 1:], g[:, :-1])  # top
    best[:, :, 1:] = torch.maximum(best[:, :, 1:], sign_similarity(g[:, :, 1:], g[:, :, :-1]))  # left
    drop = best >= threshold
    drop[:, 0, :] = False
    drop[:, :, 0] = False
    if frames > 1:
        drop[0] = False
    return drop.flatten()


class AttachedAdapTiV:
    def __init__(self, model, adapter, config: AdapTiVConfig):
        self.config = config
        self.stats = AdapTiVStats()
        self.layout_source = PromptLayout(adapter, config.frames, config.allow_text_only, "adaptiv")
        self.step = DelegateStep(self, 0, None)
        self.engine = PruningEngine.attach(model, adapter, self.step)

    def remove(self) -> None:
        self.engine.detach(self.step)
        self.layout_source.remove()

    def step_plan(self, step, visual, counts) -> bool:
        self.stats.num_visual, self.stats.dropped = list(counts), [0] * len(counts)
        return bool(sum(counts))

    def step_score(self, *args):
        return None

    def step_select(self, step, req, hidden):
        layout = self.layout_source.layout
        visual = current_visual(req)
        grid = layout.grid_index.to(hidden.device).gather(1, req.kept)
        drop = torch.zeros_like(visual)
        for b, grids in enumerate(layout.grids):
            for g in grids:
                rows = g.start + torch.arange(g.size, device=hidden.device)  # layer 0: slots are original positions
                d = grid_drop_mask(hidden[b, rows].float(), g.frames, g.height, g.width, self.config.threshold)
                drop[b, rows] = d
        drop &= visual & (grid >= 0)
        self.stats.dropped = drop.sum(1).tolist()
        kept = (visual & ~drop).sum(1).tolist()
        if not bool(drop.any()):
            return StepResult(None, kept)
        return StepResult(~drop, kept)

    def step_finish(self, step, req, cache_lengths) -> None:
        self.stats.cache_lengths = cache_lengths
        self.stats.prefills += 1


@register_method("adaptiv", family="video", config_cls=AdapTiVConfig,
                 summary="AdapTiV: sign-similarity token dropping at layer 0 (top/left neighbours)")
def attach_adaptiv(model, adapter, config: AdapTiVConfig) -> AttachedAdapTiV:
    return AttachedAdapTiV(model, adapter, config)
