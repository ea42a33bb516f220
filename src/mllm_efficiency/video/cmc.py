"""CMC (ASPLOS 2024), as the Focus repository re-implements it for LLMs (docs/video.md). Emulation only.

Frames form groups of `interval_size` (8); the I-frame is the 4th frame of each group. Every token of a group
is matched to the I-frame token with the smallest L1 distance (SAD); it is non-informative when
`SAD < threshold * dim` and is replaced by that I-frame token (an exact copy). FC layers: detection once on the
layer-0 input, the map is reused for every FC input (q/k/v, o, gate/up, down) of every layer. Query: detection
redone per layer and head with `query_threshold`. The attention-score condensation is not emulated (it needs
the probability matrix); its sparsity column is left empty.

`ratio` (without `fc_threshold`) calibrates the FC threshold on each prompt: the `round(ratio * N)` matchable
tokens (outside the I-frames) of smallest SAD become non-informative. Nothing leaves the sequence: the removed
fraction is the FC-input token sparsity (the same map in every layer); `query_threshold` keeps its value.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int, check_number
from .ratio import check_optional_ratio, explicit_note, unreachable
from ..pruning.engine import PruningEngine, StepResult
from ..registry import register_method
from .common import DelegateStep, PromptLayout
from .focus.sic import SICLinear, Site

CHUNK = 4096  # tokens per SAD block (bounds memory of the distance search)


@dataclasses.dataclass(frozen=True)
class CMCConfig(MethodConfig):
    interval_size: int = 8
    fc_threshold: float | None = None  # None: 0.4, or calibrated on each prompt for `ratio`
    query_threshold: float = 0.8
    attn_threshold: float = 5e-5
    frames: int | None = None
    allow_text_only: bool = False
    ratio: float | None = None  # fraction of visual tokens whose FC inputs are I-frame copies (every layer)

    def validate(self) -> None:
        check_optional_ratio(self.ratio)
        object.__setattr__(self, "_ratio_note", explicit_note("cmc", self.ratio,
                                                              ["fc_threshold"] if self.fc_threshold is not None else []))
        if self.fc_threshold is None and self.ratio is None:
            object.__setattr__(self, "fc_threshold", 0.4)
        check_int("interval_size", self.interval_size, 2)
        for name in ("fc_threshold", "query_threshold", "attn_threshold"):
            if getattr(self, name) is None:
                continue
            check_number(name, getattr(self, name), 0.0)
        if self.frames is not None:
            check_int("frames", self.frames, 1)


@dataclasses.dataclass
class CMCStats:
    num_visual: list[int] = dataclasses.field(default_factory=list)
    linear_sparsity: float = 0.0  # sample 0: non-informative visual tokens / visual tokens
    query_counts: list[int] = dataclasses.field(default_factory=lambda: [0, 0])  # [matched, total] (token, head)
    attn_score_sparsity: float | None = None
    prefills: int = 0
    requested_ratio: float | None = None
    ratio_note: str | None = None
    calibrated_threshold: float | None = None  # sample 0, last prefill (ratio without fc_threshold)

    @property
    def removed_fraction(self) -> float:
        """Sample 0, last prefill: the FC-input token sparsity (the same in every layer, so its layer average)."""
        return self.linear_sparsity

    @property
    def query_sparsity(self) -> float:
        return self.query_counts[0] / self.query_counts[1] if self.query_counts[1] else 0.0


def iframe_match(x: torch.Tensor, frames: int, per_frame: int, interval: int, threshold: float) -> torch.Tensor:
    """Source row of every grid token (N = frames * per_frame, rows of x in grid order, any trailing dims are
    flattened into the distance): the matched I-frame token when non-informative, itself otherwise."""
    best, match, dim = iframe_candidates(x, frames, per_frame, interval)
    return torch.where(best < threshold * dim, match, torch.arange(x.shape[0], device=x.device))


def iframe_candidates(x: torch.Tensor, frames: int, per_frame: int,
                      interval: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(smallest SAD of every grid token to its group's I-frame tokens, +inf for the I-frame's own tokens and
    groups without one; the row of that I-frame token; the distance's width `dim`)."""
    N = x.shape[0]
    flat = x.reshape(N, -1).float()
    dim = flat.shape[1]
    src = torch.arange(N, device=x.device)
    dist = torch.full((N,), float("inf"), device=x.device)
    i_pos = min(3, interval - 1)
    for g0 in range(0, frames, interval):
        i_frame = g0 + i_pos
        if i_frame >= frames:  # padded group without its I-frame: nothing to match against
            continue
        ref = flat[i_frame * per_frame:(i_frame + 1) * per_frame]
        lo, hi = g0 * per_frame, min(g0 + interval, frames) * per_frame
        for a in range(lo, hi, CHUNK):
            b = min(a + CHUNK, hi)
            sad = torch.cdist(flat[a:b], ref, p=1)
            best, arg = sad.min(dim=1)
            rows = torch.arange(a, b, device=x.device)
            in_iframe = (rows >= i_frame * per_frame) & (rows < (i_frame + 1) * per_frame)
            dist[a:b] = best.masked_fill(in_iframe, float("inf"))
            src[a:b] = i_frame * per_frame + arg
    return dist, src, dim


class AttachedCMC:
    method_name = "cmc"
    fast_decode = True  # as Focus: same tokens as model.generate, eager prefill (see video.layout, fast.support)
    def __init__(self, model, adapter, config: CMCConfig):
        self.config = config
        self.adapter = adapter
        self.stats = CMCStats(requested_ratio=config.ratio, ratio_note=getattr(config, "_ratio_note", None))
        self.layout_source = PromptLayout(adapter, config.frames, config.allow_text_only, "cmc")
        self.step = DelegateStep(self, 0, None)
        self.engine = PruningEngine.attach(model, adapter, self.step)
        self.sic_live = False
        self._rowmap: torch.Tensor | None = None  # (B, L) source row of every row for FC inputs
        self._sites, self._wrapped = [], []
        for i, layer in enumerate(adapter.layers):
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.self_attn, ("o_proj",)),
                                  (layer.mlp, ("gate_proj", "up_proj")), (layer.mlp, ("down_proj",))):
                site = Site(self, i, names[0])
                self._sites.append(site)
                for n in names:
                    inner = getattr(parent, n)
                    setattr(parent, n, SICLinear(inner, site))
                    self._wrapped.append((parent, n, inner))
        self.engine.hub.add_query_transform(self._query_transform)
        self._handle = adapter.text_model.register_forward_hook(self._after_text_model)

    def remove(self) -> None:
        for parent, name, inner in reversed(self._wrapped):
            setattr(parent, name, inner)
        self.engine.hub.remove_query_transform(self._query_transform)
        self._handle.remove()
        self.engine.detach(self.step)
        self.layout_source.remove()

    def _after_text_model(self, module, args, output):
        self.sic_live = False
        for s in self._sites:
            s.reset()

    def step_plan(self, step, visual, counts) -> bool:
        self.stats.num_visual = list(counts)
        self.stats.query_counts = [0, 0]
        self.sic_live = False
        return bool(sum(counts))

    def step_score(self, *args):
        return None

    def step_select(self, step, req, hidden):
        """Layer 0 input: build the FC map (nothing is removed)."""
        layout = self.layout_source.layout
        B, L, _ = hidden.shape
        rowmap = torch.arange(L, device=hidden.device).unsqueeze(0).repeat(B, 1)
        skipped = 0
        for b, grids in enumerate(layout.grids):
            if self.config.fc_threshold is None:
                self._calibrated(b, grids, hidden, rowmap)
            for g in grids if self.config.fc_threshold is not None else ():
                rows = g.start + torch.arange(g.size, device=hidden.device)
                src = iframe_match(hidden[b, rows], g.frames, g.height * g.width, self.config.interval_size,
                                   self.config.fc_threshold)
                rowmap[b, rows] = g.start + src
            if b == 0:
                skipped = int((rowmap[0] != torch.arange(L, device=hidden.device)).sum())
        self.stats.linear_sparsity = skipped / max(layout.n_grid[0], 1)
        self._rowmap = rowmap
        for s in self._sites:
            s.reset()
        self.sic_live = True
        return StepResult(None, list(req.visual_counts))

    def _calibrated(self, b, grids, hidden, rowmap) -> None:
        """Sample b's FC map for `ratio`: its round(ratio * N) matchable tokens of smallest SAD / dim copy their
        I-frame token (ties: earlier first); sample 0's threshold is the largest SAD / dim among them."""
        ratio = float(self.config.ratio)
        found = []
        for g in grids:
            rows = g.start + torch.arange(g.size, device=hidden.device)
            best, match, dim = iframe_candidates(hidden[b, rows], g.frames, g.height * g.width,
                                                 self.config.interval_size)
            found.append((rows, best / dim, g.start + match))
        if not found:
            return
        rows = torch.cat([f[0] for f in found])
        dist = torch.cat([f[1] for f in found])
        match = torch.cat([f[2] for f in found])
        able = int(torch.isfinite(dist).sum())
        want = int(round(ratio * rows.numel()))
        if b == 0:
            self.stats.ratio_note = None if want <= able else unreachable(
                "cmc", ratio, able / rows.numel(), "this prompt",
                f"the I-frame (4th frame) of each group of {self.config.interval_size} frames is never matched, and a "
                "grid of fewer than 4 frames (e.g. frames given as separate images) has none to match against")
        k = min(want, able)
        order = torch.sort(dist, stable=True).indices[:k]
        rowmap[b, rows[order]] = match[order]
        if b == 0:
            self.stats.calibrated_threshold = float(dist[order].max()) if k else None

    def prepare(self, x, layer, gemm):
        if self._rowmap is None or self._rowmap.shape[1] != x.shape[1]:
            return None
        return x.gather(1, self._rowmap.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def _query_transform(self, module, query, kwargs):
        if not self.sic_live or query.shape[2] < 2:
            return query
        layout = self.layout_source.layout
        out = query.clone()
        for b, grids in enumerate(layout.grids):
            for g in grids:
                rows = g.start + torch.arange(g.size, device=query.device)
                for h in range(query.shape[1]):
                    q = query[b, h, rows]
                    src = iframe_match(q, g.frames, g.height * g.width, self.config.interval_size,
                                       self.config.query_threshold)
                    out[b, h, rows] = q[src]
                    if b == 0:
                        self.stats.query_counts[0] += int((src != torch.arange(g.size, device=q.device)).sum())
                        self.stats.query_counts[1] += g.size
        return out

    def step_finish(self, step, req, cache_lengths) -> None:
        self.stats.prefills += 1
        self.sic_live = False


@register_method("cmc", family="video", config_cls=CMCConfig,
                 summary="CMC: codec-style I-frame matching of FC and query inputs (emulation, sparsity)")
def attach_cmc(model, adapter, config: CMCConfig) -> AttachedCMC:
    return AttachedCMC(model, adapter, config)
