"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): FastV-style rank-and-drop at several stage boundaries.

The decoder is split into stages at `layer_list` (LLaVA-1.5-7B, 32 layers: 8, 16, 24; by default here the
same quarters of any depth: round(T/4), round(T/2), round(3T/4)). At the input of boundary layer l_s the
visual tokens still present are ranked by the attention the last prompt token (the last instruction token)
gives them, mean over heads, and the best keep_s stay, keep_s = keep(N, 1 - lambda^s) of the prompt's N visual
tokens (the authors' image_token_ratio_list 0.5, 0.25, 0.125 for lambda = 0.5), keep(N, R) =
clamp(round(N * (1 - R)), 1, N). The attention row comes from the post-RoPE q/k of layer l_s - 1 (the stage's
last layer; the authors recompute it with layer l_s's projections on the same hidden states), as FastV does:
no eager attention is needed.

`ratio` (fraction removed, as for every pruning method): when given, lambda is the one whose layer-averaged
visual-token count equals that of dropping `ratio` of the visual tokens before layer 0, i.e.
    (l_1 + (l_2 - l_1) lambda + ... + (T - l_S) lambda^S) / T = 1 - ratio
(solved by bisection; the visual tokens' share of the linear FLOPs is then the same; rounding of keep_s makes it
approximate). ratio = 0 gives lambda = 1 (nothing dropped). A ratio above 1 - l_1 / T is not reachable with these
boundaries (the first stage keeps every token): choose an earlier `layer_list`. `ratio=None` uses `lambda_`
(the paper's 0.5); `image_token_ratio_list` gives the retained fraction per stage explicitly.
Spec: docs/token_pruning.md.
"""
from __future__ import annotations

import dataclasses

from ..config import MethodConfig, check_number, check_ratio, check_unit_fraction, layer_tuple
from ..errors import ConfigError
from ..registry import register_method
from .engine import PruningEngine, PruningStats
from .fastv import FastVConfig, FastVStep


@dataclasses.dataclass(frozen=True)
class PDropConfig(MethodConfig):
    ratio: float | None = None  # fraction of visual tokens removed, FLOPs-equivalent (sets lambda_)
    layer_list: tuple[int, ...] | None = None  # stage boundaries; None: the quarters of the decoder (8, 16, 24 of 32)
    lambda_: float = 0.5  # the paper's lambda: retained fraction at each boundary
    image_token_ratio_list: tuple[float, ...] | None = None  # retained fraction after each boundary (cumulative)
    allow_text_only: bool = False

    def validate(self) -> None:
        if self.ratio is not None:
            check_ratio("ratio", self.ratio)
            if self.image_token_ratio_list is not None:
                raise ConfigError("pdrop: give ratio or image_token_ratio_list, not both")
        check_number("lambda_", self.lambda_, 0.0, 1.0, low_open=True)
        if self.layer_list is not None:
            object.__setattr__(self, "layer_list", layer_tuple("pdrop", "layer_list", self.layer_list, 1))
        if self.image_token_ratio_list is not None:
            if not isinstance(self.image_token_ratio_list, (tuple, list)):
                raise ConfigError("pdrop: image_token_ratio_list must be a tuple or list, got "
                                  f"{self.image_token_ratio_list!r}")
            object.__setattr__(self, "image_token_ratio_list", tuple(self.image_token_ratio_list))
            for i, r in enumerate(self.image_token_ratio_list):
                check_unit_fraction(f"image_token_ratio_list[{i}]", r)
            if list(self.image_token_ratio_list) != sorted(self.image_token_ratio_list, reverse=True):
                raise ConfigError("pdrop: image_token_ratio_list must not increase")
            if self.layer_list is not None and len(self.layer_list) != len(self.image_token_ratio_list):
                raise ConfigError("pdrop: layer_list and image_token_ratio_list need the same length")


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's boundaries 8, 16, 24 of 32 layers, as quarters of any depth (at least layer 1)."""
    return tuple(sorted({max(1, min(num_layers - 1, round(num_layers * s / 4))) for s in (1, 2, 3)}))


def average_fraction(lam: float, layers: tuple[int, ...], num_layers: int) -> float:
    """Visual tokens per layer, averaged over the decoder, as a fraction of N (lambda^s after boundary s)."""
    bounds = (0,) + tuple(layers) + (num_layers,)
    return sum((bounds[s + 1] - bounds[s]) * lam ** s for s in range(len(bounds) - 1)) / num_layers


def lambda_for_ratio(ratio: float, layers: tuple[int, ...], num_layers: int) -> float:
    """The lambda whose layer-averaged visual-token count is (1 - ratio) N (bisection; increasing in lambda)."""
    if ratio == 0:
        return 1.0
    target = 1.0 - ratio
    floor = layers[0] / num_layers
    if target < floor:
        raise ConfigError(f"pdrop: ratio={ratio} is not reachable with layer_list={layers} on {num_layers} layers "
                          f"(every token stays before layer {layers[0]}: at most {1 - floor:.3f}); "
                          "give an earlier layer_list")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if average_fraction(mid, layers, num_layers) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclasses.dataclass
class PDropStats(PruningStats):
    lambda_: float = 0.0
    layer_list: tuple[int, ...] = ()
    stage_keep_counts: list[list[int]] = dataclasses.field(default_factory=list)  # per stage, per sample


class AttachedPDrop:
    def __init__(self, model, adapter, config: PDropConfig):
        T = adapter.num_layers
        if adapter.sliding_window_layers():
            raise NotImplementedError("pdrop on models with sliding-window layers is not supported")
        layers = config.layer_list if config.layer_list is not None else default_layers(T)
        if layers[-1] >= T:
            raise ConfigError(f"pdrop: layer_list entries must be in [1, {T - 1}] for this model ({T} decoder "
                              f"layers), got {layers}")
        if config.image_token_ratio_list is not None:
            if len(config.image_token_ratio_list) != len(layers):
                raise ConfigError(f"pdrop: image_token_ratio_list needs one entry per boundary {layers}")
            fractions = list(config.image_token_ratio_list)
            lam = float("nan")
        else:
            lam = config.lambda_ if config.ratio is None else lambda_for_ratio(config.ratio, layers, T)
            fractions = [lam ** (s + 1) for s in range(len(layers))]
        self.lambda_, self.layer_list = lam, layers
        self.steps = []
        for layer, kept in zip(layers, fractions):
            removed = min(max(0.0, 1.0 - kept), 1.0 - 1e-12)
            step = FastVStep(FastVConfig(k=layer, ratio=removed, allow_text_only=config.allow_text_only))
            step.method_name = "pdrop"
            self.steps.append(step)
        self.engine = None
        for step in self.steps:
            self.engine = PruningEngine.attach(model, adapter, step)

    @property
    def stats(self) -> PDropStats:
        last = self.steps[-1].stats
        return PDropStats(num_visual=self.steps[0].stats.num_visual, keep_count=last.keep_count,
                          kept_visual_mask=last.kept_visual_mask, cache_lengths=last.cache_lengths,
                          prefills=last.prefills, lambda_=self.lambda_, layer_list=self.layer_list,
                          stage_keep_counts=[list(s.stats.keep_count) for s in self.steps])

    def remove(self) -> None:
        for step in self.steps:
            self.engine.detach(step)


@register_method("pdrop", family="pruning", config_cls=PDropConfig,
                 summary="PyramidDrop: FastV-style rank-and-drop at several stage boundaries, keep lambda each")
def attach_pdrop(model, adapter, config: PDropConfig) -> AttachedPDrop:
    return AttachedPDrop(model, adapter, config)
