"""CMC (ASPLOS 2024), as the Focus repository re-implements it for LLMs (docs/video.md). Emulation only.

Frames form groups of `interval_size` (8); the I-frame is the 4th frame of each group. Every token of a group
is matched to the I-frame token with the smallest L1 distance (SAD); it is non-informative when
`SAD < threshold * dim` and is replaced by that I-frame token (an exact copy). FC layers: detection once on the
layer-0 input, the map is reused for every FC input (q/k/v, o, gate/up, down) of every layer. Query: detection
redone per layer and head with `query_threshold`. The attention-score condensation is not emulated (it needs
the probability matrix); its sparsity column is left empty.
"""
from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int, check_number
from ..pruning.engine import PruningEngine, StepResult
from ..registry import register_method
from .common import DelegateStep, PromptLayout
from .focus.sic import SICLinear, Site

CHUNK = 4096  # tokens per SAD block (bounds memory of the distance search)


@dataclasses.dataclass(frozen=True)
class CMCConfig(MethodConfig):
    interval_size: int = 8
    fc_threshold: float = 0.4
    query_threshold: float = 0.8
    attn_threshold: float = 5e-5
    frames: int | None = None
    allow_text_only: bool = False

    def validate(self) -> None:
        check_int("interval_size", self.interval_size, 2)
        for name in ("fc_threshold", "query_threshold", "attn_threshold"):
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

    @property
    def query_sparsity(self) -> float:
        return self.query_counts[0] / self.query_counts[1] if self.query_counts[1] else 0.0


def iframe_match(x: torch.Tensor, frames: int, per_frame: int, interval: int, threshold: float) -> torch.Tensor:
    """Source row of every grid token (N = frames * per_frame, rows of x in grid order, any trailing dims are
    flattened into the distance): the matched I-frame token when non-informative, itself otherwise."""
    N = x.shape[0]
    flat = x.reshape(N, -1).float()
    dim = flat.shape[1]
    src = torch.arange(N, device=x.device)
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
            hit = best < threshold * dim
            rows = torch.arange(a, b, device=x.device)
            in_iframe = (rows >= i_frame * per_frame) & (rows < (i_frame + 1) * per_frame)
            hit &= ~in_iframe
            src[a:b] = torch.where(hit, i_frame * per_frame + arg, rows)
    return src


class AttachedCMC:
    method_name = "cmc"
    fast_decode = False  # as Focus: decode-time state the slot decoder does not reproduce
    def __init__(self, model, adapter, config: CMCConfig):
        self.config = config
        self.adapter = adapter
        self.stats = CMCStats()
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
            for g in grids:
                rows = g.start + torch.arange(g.size, device=hidden.device)
                src = iframe_match(hidden[b, rows], g.frames, g.height * g.width, self.config.interval_size,
                                   self.config.fc_threshold)
                rowmap[b, rows] = g.start + src
                if b == 0:
                    skipped += int((src != torch.arange(g.size, device=hidden.device)).sum())
        self.stats.linear_sparsity = skipped / max(layout.n_grid[0], 1)
        self._rowmap = rowmap
        for s in self._sites:
            s.reset()
        self.sic_live = True
        return StepResult(None, list(req.visual_counts))

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
