"""FrameFusion (arXiv 2501.01986): merge tokens similar to the previous frame's token at the same spatial
position in early layers, then prune by importance to a cost budget. Spec: docs/video.md.

Merging runs at the input of layers 0, 1, ... (on the pruning engine, `next_layer` placement: after a layer's
full residual stream rather than after its attention residual add) until the merge ratio falls below
`ratio_lower_bound` or the budget is met; then, once, the last query row's attention of the previous layer
(mean over heads) keeps the top `round(N * (1 - p))` visual tokens. T is the model's real layer count.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import MethodConfig, check_int, check_similarity, check_unit_fraction
from ..errors import ConfigError
from ..pruning.engine import PruningEngine, StepResult
from ..core.attention_rows import key_scores
from ..registry import register_method
from .common import DelegateStep, PromptLayout, current_visual, topk_keep
from .ratio import check_optional_ratio, explicit_note, layer_removed_fraction


def prune_ratio(history: list[float], num_layers: int, cost: float) -> float:
    """p = max(0, 1 - (T*cost - used) / ((T - n) * s_n)) with s_i = prod_{j<=i}(1 - r_j), used = sum_i s_i."""
    n = len(history)
    s, used = 1.0, 0.0
    for r in history:
        s *= 1.0 - r
        used += s
    if num_layers * cost < used:  # as the authors' code: no prune ratio in [0, 1] meets the budget any more
        raise ConfigError(f"framefusion: the cost is too small: cost={cost} allows {num_layers * cost:.3g} layer-"
                          f"equivalents of the visual tokens over {num_layers} layers, but the first {n} layer(s) "
                          f"after merging already used {used:.3g}; use cost >= {used / num_layers:.3g} (allowed (0, 1])")
    if n >= num_layers:
        return 0.0
    if s <= 0:
        return 0.0
    share = (num_layers * cost - used) / ((num_layers - n) * s)
    return max(0.0, 1.0 - share)


@dataclasses.dataclass(frozen=True)
class FrameFusionConfig(MethodConfig):
    cost: float | None = None  # None: 1 - ratio when ratio is given, else 0.3 (the authors' default)
    similarity_lower_bound: float = 0.6  # S_th
    ratio_lower_bound: float = 0.1
    frames: int | None = None
    allow_text_only: bool = False
    ratio: float | None = None  # fraction of visual tokens removed, layer-averaged: sets cost = 1 - ratio

    def validate(self) -> None:
        check_optional_ratio(self.ratio)
        object.__setattr__(self, "_ratio_note", explicit_note("framefusion", self.ratio,
                                                              ["cost"] if self.cost is not None else []))
        if self.cost is None:  # cost is the layer-averaged fraction of the visual tokens computed: 1 - RATIO
            object.__setattr__(self, "cost", 0.3 if self.ratio is None else 1.0 - float(self.ratio))
        for name in ("cost", "ratio_lower_bound"):
            check_unit_fraction(name, getattr(self, name))
        check_similarity("similarity_lower_bound", self.similarity_lower_bound)
        if self.frames is not None:
            check_int("frames", self.frames, 1)


@dataclasses.dataclass
class FrameFusionStats:
    num_visual: list[int] = dataclasses.field(default_factory=list)
    merge_ratios: list[float] = dataclasses.field(default_factory=list)  # sample 0 history
    prune_ratio: float = 0.0
    prune_layer: int | None = None
    visual_per_layer: list[int] = dataclasses.field(default_factory=list)  # sample 0
    cache_lengths: list[int] | None = None
    prefills: int = 0
    layer_visual: list[int] = dataclasses.field(default_factory=list)  # sample 0: visual tokens each layer computes
    num_layers: int = 0
    requested_ratio: float | None = None
    ratio_note: str | None = None

    @property
    def removed_fraction(self) -> float | None:
        """Sample 0, last prefill: 1 - visual tokens computed summed over layers / (T * N)."""
        return layer_removed_fraction(self.layer_visual, self.num_visual[0] if self.num_visual else 0,
                                      self.num_layers)


class AttachedFrameFusion:
    method_name = "framefusion"
    # the fast path gives model.generate's tokens (slot decode steps; the prefill, which merges and prunes on the
    # host, runs eagerly: these steps declare no graph_capture). The 0.04 logit gap once seen here was
    # model.generate's, not the fast path's: generate() hid the video's frame grid from the layout
    # (video.layout: generate() pre-encodes the pixels), see docs/fast_path.md
    fast_decode = True
    def __init__(self, model, adapter, config: FrameFusionConfig):
        if adapter.sliding_window_layers():
            raise NotImplementedError("framefusion on models with sliding-window layers is not supported")
        self.config = config
        self.T = adapter.num_layers
        self.stats = FrameFusionStats(num_layers=self.T, requested_ratio=config.ratio,
                                      ratio_note=getattr(config, "_ratio_note", None))
        self.layout_source = PromptLayout(adapter, config.frames, config.allow_text_only, "framefusion")
        self.steps = [DelegateStep(self, i, i - 1 if i else None) for i in range(self.T)]
        for step in self.steps:
            self.engine = PruningEngine.attach(model, adapter, step)

    def remove(self) -> None:
        for step in self.steps:
            self.engine.detach(step)
        self.layout_source.remove()

    # ----------------------------------------------------------------- engine callbacks
    def step_plan(self, step, visual, counts) -> bool:
        if step.layer == 0:
            self.merging, self.done, self.history = True, False, []
            self.stats.num_visual = list(counts)
            self.stats.merge_ratios, self.stats.prune_layer, self.stats.visual_per_layer = [], None, []
            self.stats.prune_ratio = 0.0
            self.stats.layer_visual = []
        return bool(sum(counts))

    def step_score(self, step, req, module, query, key, attention_mask, kwargs):
        # the pruning stage (if it comes at the next layer) uses this layer's last query row
        if self.done:
            return None
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        return key_scores(query, key, attention_mask, scaling, "last_row", "mean", "mean")

    def step_select(self, step, req, hidden):
        result = self._select(step, req, hidden)
        self.stats.layer_visual.append(int(result.kept_visual[0]))
        return result

    def _select(self, step, req, hidden):
        scores = req.scores.pop(step, None)
        visual = current_visual(req)
        self.stats.visual_per_layer.append(int(visual[0].sum()))
        if self.done:
            return StepResult(None, list(req.visual_counts))
        if self.merging:
            return self._merge(req, hidden, visual)
        # pruning stage, once
        self.done = True
        p = prune_ratio(self.history, self.T, self.config.cost)
        self.stats.prune_ratio, self.stats.prune_layer = p, step.layer
        if p <= 0 or scores is None:
            return StepResult(None, list(req.visual_counts))
        counts = visual.sum(1).tolist()
        targets = [int(round(n * (1 - p))) for n in counts]
        keep = topk_keep(scores[:, -visual.shape[1]:], visual, targets)
        self.stats.visual_per_layer[-1] = targets[0]
        return StepResult(~visual | keep, targets)

    def _merge(self, req, hidden, visual):
        cfg = self.config
        layout = self.layout_source.layout
        grid = layout.grid_index.to(hidden.device).gather(1, req.kept)
        B, Lc, _ = hidden.shape
        members = torch.zeros(B, Lc, dtype=torch.bool, device=hidden.device)
        heads = torch.arange(Lc, device=hidden.device).unsqueeze(0).repeat(B, 1)
        sims, prevs = [], []
        for b in range(B):
            sim, prev = self._adjacent_similarity(hidden[b], grid[b], visual[b], layout.grids[b])
            sims.append(sim)
            prevs.append(prev)
        p = prune_ratio(self.history, self.T, cfg.cost)
        ratios = []
        stop_all = False
        for b in range(B):
            n = int(visual[b].sum())
            cand = (prevs[b] >= 0) & (sims[b] >= cfg.similarity_lower_bound)
            r = float(cand.sum()) / max(n, 1)
            if r < p:
                chosen = cand
            else:
                k = int(math.floor(p * n))
                chosen = topk_keep(sims[b].masked_fill(~cand, float("-inf"))[None], cand[None], [k])[0]
                stop_all = True
            ratios.append(float(chosen.sum()) / max(n, 1))
            members[b] = chosen
            heads[b] = self._run_heads(chosen, prevs[b], Lc)
        r0 = ratios[0]
        if stop_all:
            self.merging, self.done = False, True
            self.stats.prune_ratio = 0.0
        else:
            self.history.append(r0)
            self.stats.merge_ratios.append(r0)
            if r0 < cfg.ratio_lower_bound:
                self.merging = False
        if not bool(members.any()):
            return StepResult(None, list(req.visual_counts))
        # unweighted mean of each run's head and its members, in fp32
        flat_heads = (heads + torch.arange(B, device=hidden.device)[:, None] * Lc).flatten()
        x = hidden.reshape(B * Lc, -1).float()
        sums = torch.zeros_like(x).index_add_(0, flat_heads, x)
        cnt = torch.zeros(B * Lc, device=hidden.device).index_add_(0, flat_heads, torch.ones(B * Lc, device=hidden.device))
        merged = (sums / cnt.clamp_min(1)[:, None]).view(B, Lc, -1).to(hidden.dtype)
        is_head = cnt.view(B, Lc) > 1
        new_hidden = torch.where(is_head[..., None], merged, hidden)
        kept = (~members).sum(1) - (~visual).sum(1)
        return StepResult(~members, kept.tolist(), new_hidden)

    @staticmethod
    def _adjacent_similarity(h, grid, visual, grids):
        """Cosine of each visual slot with the previous remaining slot at the same spatial position."""
        Lc = h.shape[0]
        sim = torch.zeros(Lc, device=h.device)
        prev = torch.full((Lc,), -1, dtype=torch.long, device=h.device)
        slots = visual.nonzero().flatten()
        if slots.numel() == 0:
            return sim, prev
        g = grid[slots]
        starts = torch.tensor([0] + [x.size for x in grids], device=h.device).cumsum(0)
        span = torch.bucketize(g, starts[1:], right=True)
        per_frame = torch.tensor([x.height * x.width for x in grids], device=h.device)
        local = g - starts[span]
        key = span * (1 << 32) + local % per_frame[span]  # (grid, spatial position); slots are in time order
        order = torch.sort(key, stable=True).indices
        ks, ss = key[order], slots[order]
        same = torch.zeros_like(ks, dtype=torch.bool)
        same[1:] = ks[1:] == ks[:-1]
        p = torch.where(same, torch.cat([ss[:1], ss[:-1]]), torch.full_like(ss, -1))
        prev[ss] = p
        hf = torch.nn.functional.normalize(h.float(), dim=-1)
        ok = prev >= 0
        sim[ok] = (hf[ok] * hf[prev[ok]]).sum(-1)
        return sim, prev

    @staticmethod
    def _run_heads(chosen, prev, Lc):
        """Head (the last unmerged slot before a run of merged slots) of every slot; own index otherwise."""
        head = torch.arange(Lc, device=chosen.device)
        ptr = torch.where(chosen, prev, head)
        while True:
            nxt = ptr[ptr]
            if torch.equal(nxt, ptr):
                return ptr
            ptr = nxt

    def step_finish(self, step, req, cache_lengths) -> None:
        if step is self.steps[-1] or step is req.active_steps[-1]:
            self.stats.cache_lengths = cache_lengths
            self.stats.prefills += 1


@register_method("framefusion", family="video", config_cls=FrameFusionConfig,
                 summary="FrameFusion: merge adjacent-frame similar tokens in early layers, then prune to a cost budget")
def attach_framefusion(model, adapter, config: FrameFusionConfig) -> AttachedFrameFusion:
    return AttachedFrameFusion(model, adapter, config)
