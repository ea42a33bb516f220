"""AdapTiV (MICRO 2024), as the Focus repository re-implements it for LLMs (docs/video.md): once, at
layer 0 before attention (prefill), each visual token is compared with its top and left neighbours in the
same frame by sign similarity `(#equal signs - #different signs) / dim`; a token whose best similarity is
>= `threshold` is dropped without averaging. Row 0, column 0 and the first frame of a multi-frame input are
never dropped. Runs as a K = 0 prune on the pruning engine: a real speedup.

`ratio` (without `threshold`) calibrates the threshold on each prompt: the `round(ratio * N)` eligible tokens of
highest best similarity are dropped (ties: earlier first), the threshold being the lowest of them; a prompt with
fewer eligible tokens drops them all and says so (`stats.ratio_note`)."""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int, check_similarity
from ..pruning.engine import PruningEngine, StepResult
from ..registry import register_method
from .common import DelegateStep, PromptLayout, current_visual, topk_keep
from .ratio import check_optional_ratio, explicit_note, unreachable

DEFAULT_THRESHOLD = 0.6


@dataclasses.dataclass(frozen=True)
class AdapTiVConfig(MethodConfig):
    threshold: float | None = None  # None: 0.6, or calibrated on each prompt for `ratio`
    frames: int | None = None
    allow_text_only: bool = False
    ratio: float | None = None  # fraction of visual tokens removed (dropped at layer 0: every layer's fraction)

    def validate(self) -> None:
        check_optional_ratio(self.ratio)
        object.__setattr__(self, "_ratio_note", explicit_note("adaptiv", self.ratio,
                                                              ["threshold"] if self.threshold is not None else []))
        if self.threshold is None and self.ratio is None:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD)
        if self.threshold is not None:
            check_similarity("threshold", self.threshold, "sign similarity")
        if self.frames is not None:
            check_int("frames", self.frames, 1)


@dataclasses.dataclass
class AdapTiVStats:
    num_visual: list[int] = dataclasses.field(default_factory=list)
    dropped: list[int] = dataclasses.field(default_factory=list)
    cache_lengths: list[int] | None = None
    prefills: int = 0
    requested_ratio: float | None = None
    ratio_note: str | None = None
    calibrated_threshold: float | None = None  # sample 0, last prefill (ratio without threshold)

    @property
    def removed_fraction(self) -> float | None:
        """Sample 0, last prefill: dropped before layer 0, so every layer's fraction and their average."""
        return self.dropped[0] / self.num_visual[0] if self.num_visual and self.num_visual[0] else None

    @property
    def token_sparsity(self) -> float:
        n = sum(self.num_visual)
        return sum(self.dropped) / n if n else 0.0


def sign_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(#equal signs - #different signs) / dim along the last axis (sign = x >= 0)."""
    equal = ((a >= 0) == (b >= 0)).float().mean(-1)
    return 2 * equal - 1


def grid_best_similarity(x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """(frames*height*width,): each token's best sign similarity with its top / left neighbour; -inf for the
    tokens never dropped (row 0, column 0, the first frame of a multi-frame grid)."""
    g = x.view(frames, height, width, -1)
    best = torch.full((frames, height, width), float("-inf"), device=x.device)
    best[:, 1:, :] = sign_similarity(g[:, 1:], g[:, :-1])  # top
    best[:, :, 1:] = torch.maximum(best[:, :, 1:], sign_similarity(g[:, :, 1:], g[:, :, :-1]))  # left
    best[:, 0, :] = float("-inf")
    best[:, :, 0] = float("-inf")
    if frames > 1:
        best[0] = float("-inf")
    return best.flatten()


def grid_drop_mask(x: torch.Tensor, frames: int, height: int, width: int, threshold: float) -> torch.Tensor:
    """Bool (frames*height*width,): tokens of one grid (rows in grid order) that AdapTiV drops."""
    return grid_best_similarity(x, frames, height, width) >= threshold


class AttachedAdapTiV:
    def __init__(self, model, adapter, config: AdapTiVConfig):
        self.config = config
        self.stats = AdapTiVStats(requested_ratio=config.ratio, ratio_note=getattr(config, "_ratio_note", None))
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
        calibrate = self.config.threshold is None
        drop = torch.zeros_like(visual)
        best = torch.full(visual.shape, float("-inf"), device=hidden.device)
        for b, grids in enumerate(layout.grids):
            for g in grids:
                rows = g.start + torch.arange(g.size, device=hidden.device)  # layer 0: slots are original positions
                if calibrate:
                    best[b, rows] = grid_best_similarity(hidden[b, rows].float(), g.frames, g.height, g.width)
                else:
                    drop[b, rows] = grid_drop_mask(hidden[b, rows].float(), g.frames, g.height, g.width,
                                                   self.config.threshold)
        if calibrate:
            drop = self._calibrated(best.masked_fill(~(visual & (grid >= 0)), float("-inf")), visual)
        drop &= visual & (grid >= 0)
        self.stats.dropped = drop.sum(1).tolist()
        kept = (visual & ~drop).sum(1).tolist()
        if not bool(drop.any()):
            return StepResult(None, kept)
        return StepResult(~drop, kept)

    def _calibrated(self, best: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The round(ratio * N) eligible tokens of highest best similarity per sample (the calibrated threshold)."""
        ratio = float(self.config.ratio)
        eligible = torch.isfinite(best)
        counts, able = visual.sum(1).tolist(), eligible.sum(1).tolist()
        want = [int(round(ratio * n)) for n in counts]
        if want[0] > able[0]:
            self.stats.ratio_note = unreachable(
                "adaptiv", ratio, able[0] / max(counts[0], 1), "this prompt",
                "row 0, column 0 and the first frame of each grid are never dropped")
        else:
            self.stats.ratio_note = None
        keep = [min(w, a) for w, a in zip(want, able)]
        drop = topk_keep(best.masked_fill(~eligible, 0.0), eligible, keep)
        chosen = best[0][drop[0]]
        self.stats.calibrated_threshold = float(chosen.min()) if chosen.numel() else None
        return drop

    def step_finish(self, step, req, cache_lengths) -> None:
        self.stats.cache_lengths = cache_lengths
        self.stats.prefills += 1


@register_method("adaptiv", family="video", config_cls=AdapTiVConfig,
                 summary="AdapTiV: sign-similarity token dropping at layer 0 (top/left neighbours)")
def attach_adaptiv(model, adapter, config: AdapTiVConfig) -> AttachedAdapTiV:
    return AttachedAdapTiV(model, adapter, config)
