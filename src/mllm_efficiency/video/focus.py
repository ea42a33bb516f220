"""Focus (arXiv 2512.14661): semantic concentration (prompt-guided progressive pruning) and similarity
concentration (vector-wise dedup of GEMM inputs). Spec: docs/video.md.

SEC: at every `selected_layers[i]` the text rows after the visual span score each surviving grid token
(attention probabilities, max over heads then max over rows, computed from the post-RoPE q/k by the method,
never as an L x L matrix); the top `max(1, int(alpha_i * n_visual_original))` survive. Pruning runs on the
shared pruning engine at the input of the next layer; with `placement="mid_layer"` (the reference's semantics)
the selected layer's MLP runs on the surviving rows only (gathered before it; the rows the next layer drops
get a zero MLP output) and its similarity matching sees only them; `placement="next_layer"` runs that MLP on
every row. The MLP is row-wise, so kept states are equal either way. Keep counts and the first scoring row are
known on the host: a prefill needs no device-to-host transfer beyond the engine's one visual count.

SIC (prefill only) wraps the linear layers at the GEMM inputs `q_proj` (shared by q/k/v), `o_proj`,
`gate_proj` (shared by gate/up), `down_proj`, and transforms Q after RoPE (`query`) through the attention hub:
- `sic_mode="emulate"`: matched vectors are replaced by their group mean, the GEMM runs densely (accuracy of
  the accelerator, no speedup; the savings are simulated from the recorded sparsity);
- `sic_mode="token_dedup"`: whole-token matching, the GEMM runs on the unique rows only and the result is
  expanded to every member (real savings; `query` is not deduplicated: fused attention kernels). The candidate
  table of the current rows is built once per kept set (SEC stage), the matching once per GEMM input (q/k/v and
  gate/up share theirs, group means included) with one host sync. `min_dedup_fraction` (gather/scatter only
  pay off above a break-even fraction) decides per SEC stage first: the stage's first dedup point estimates its
  duplicate fraction on at most `similarity.SAMPLE_ROWS` rows, read in the same host sync as the stage's
  candidate table; below the cut every GEMM of the stage (the layers up to the next selected layer) runs
  densely, with no other matching, table or sync. In a stage above it, the first point of each layer decides
  for its layer (sampled likewise, one sync), and the points of a deciding layer are matched in full and
  deduplicated when their own exact fraction reaches the cut. On CUDA (`fused_kernels`, default on where Triton
  imports) the matching and the group means are Triton kernels (`dedup_kernels`), every point is matched in full
  and decides on its exact fraction, plan and means are queued before the point's sync, and SEC stages after
  the first are decided one layer late without draining the GPU's queue. `whole_mlp` runs gate, up and down
  once on the gate/up point's unique rows; `min_dedup_rows` and `dedup_stages="until_dense"` skip points where a
  host sync costs more than it saves (Focus's GPU fast path combines the three, docs/video.md);
- `sic_mode="off"`: SEC only (`sec_only=True` is its deprecated spelling).
"""
from __future__ import annotations

import bisect
import dataclasses
import warnings

import torch
from torch import nn

from ..config import (MethodConfig, check_bool, check_choice, check_int, check_similarity, check_unit_fraction,
                      is_number)
from ..errors import ConfigError
from ..pruning.engine import PruningEngine, StepResult
from ..core.attention_rows import key_scores
from ..registry import register_method
from . import dedup_kernels as DK
from . import similarity as S
from .common import DelegateStep, PromptLayout, current_visual, topk_keep

GEMMS = ("q_proj", "query", "o_proj", "gate_proj", "down_proj")
MLP_GEMMS = ("gate_proj", "down_proj")
DEDUP_GEMMS = ("q_proj", "o_proj", "gate_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class FocusConfig(MethodConfig):
    selected_layers: tuple = (2, 5, 8, 16, 25)
    alpha_list: tuple = (0.4, 0.3, 0.2, 0.15, 0.1)
    similarity_threshold: float = 0.9
    vector_size: int | None = None  # None: 32 (emulate) / full width (token_dedup); 0 = full width
    block_size: int | None = None  # S of the T x S x S block; None: 2 (emulate) / 1 (token_dedup)
    frame_block_size: int = 2  # T
    gemm_m_size: int = 1024  # unpruned tokens per M-tile; -1 = one tile
    sic_mode: str = "emulate"
    gemms: tuple = GEMMS
    mask_row_wrap: bool = False
    min_dedup_fraction: float = 0.15  # token_dedup: duplicate-row fraction below which GEMMs run dense
    fused_kernels: bool | None = None  # token_dedup: Triton matching / group means (None: on CUDA with Triton)
    whole_mlp: bool = False  # token_dedup: the gate/up groups carry through the MLP (down_proj not matched)
    min_dedup_rows: int = 0  # token_dedup: GEMM inputs with fewer rows run dense, unmatched
    dedup_stages: str = "each"  # token_dedup: "each" stage decides for itself; "until_dense": none after a dense one
    placement: str = "mid_layer"
    frames: int | None = None  # frame count when the processor's grid information is not available
    record_trace: bool = False
    allow_text_only: bool = False

    def validate(self) -> None:
        object.__setattr__(self, "selected_layers", tuple(self.selected_layers))
        object.__setattr__(self, "alpha_list", tuple(self.alpha_list))
        object.__setattr__(self, "gemms", tuple(self.gemms))
        if len(self.selected_layers) != len(self.alpha_list):
            raise ConfigError(f"selected_layers and alpha_list must have the same length, got "
                              f"{len(self.selected_layers)} and {len(self.alpha_list)}")
        for i, layer in enumerate(self.selected_layers):
            check_int(f"selected_layers[{i}]", layer, 0)
        if list(self.selected_layers) != sorted(set(self.selected_layers)):
            raise ConfigError(f"selected_layers must be strictly increasing, got {list(self.selected_layers)}")
        for i, a in enumerate(self.alpha_list):
            check_unit_fraction(f"alpha_list[{i}]", a)
        check_similarity("similarity_threshold", self.similarity_threshold)
        if self.vector_size is not None:
            check_int("vector_size", self.vector_size, 0)
        if self.block_size is not None:
            check_int("block_size", self.block_size, 1, 8)
        check_int("frame_block_size", self.frame_block_size, 1, 8)
        if (self.block_size or 2) == 1 and self.frame_block_size == 1:
            raise ConfigError("block_size=1 with frame_block_size=1 leaves no neighbour to match: "
                              "use a T x S x S block with T >= 2 or S >= 2")
        f = self.min_dedup_fraction
        if not is_number(f) or not (0.0 <= float(f) <= 1.0):
            raise ConfigError(f"min_dedup_fraction must be in [0, 1], got {f!r}")
        if self.gemm_m_size != -1:
            check_int("gemm_m_size", self.gemm_m_size, 1)
        check_choice("sic_mode", self.sic_mode, ("emulate", "token_dedup", "off"))
        check_choice("placement", self.placement, ("mid_layer", "next_layer"))
        check_choice("dedup_stages", self.dedup_stages, ("each", "until_dense"))
        for g in self.gemms:
            check_choice("gemms", g, GEMMS)
        if self.frames is not None:
            check_int("frames", self.frames, 1)
        if self.fused_kernels not in (None, True, False):
            raise ConfigError(f"fused_kernels must be None (auto), True or False, got {self.fused_kernels!r}")
        check_int("min_dedup_rows", self.min_dedup_rows, 0)
        if self.whole_mlp and (self.sic_mode != "token_dedup" or "gate_proj" not in self.gemms):
            raise ConfigError("whole_mlp needs sic_mode='token_dedup' with 'gate_proj' in gemms, got "
                              f"sic_mode={self.sic_mode!r}, gemms={list(self.gemms)}")
        if self.fused_kernels and DK.triton is None:
            raise ConfigError("fused_kernels=True needs Triton (pip install triton); use None (auto) or False")

    @classmethod
    def from_kwargs(cls, method: str, **kwargs) -> "FocusConfig":
        """`sec_only=True` is the deprecated spelling of `sic_mode="off"`."""
        if "sec_only" in kwargs:
            sec_only = kwargs.pop("sec_only")
            check_bool("sec_only", sec_only)
            warnings.warn(f'{method}: sec_only is deprecated; use sic_mode="off"', DeprecationWarning, stacklevel=3)
            if sec_only:
                if kwargs.get("sic_mode", "off") != "off":
                    raise ConfigError(f"{method}: sec_only=True contradicts sic_mode={kwargs['sic_mode']!r}; "
                                      'use sic_mode="off" alone')
                kwargs["sic_mode"] = "off"
        return super().from_kwargs(method, **kwargs)

    @property
    def sic_on(self) -> bool:
        return self.sic_mode != "off"

    @property
    def vector(self) -> int:
        if self.vector_size is not None:
            return self.vector_size
        return 32 if self.sic_mode == "emulate" else 0

    @property
    def block(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return 2 if self.sic_mode == "emulate" else 1

    @property
    def active_gemms(self) -> tuple:
        if self.sic_mode == "token_dedup":
            return tuple(g for g in self.gemms if g in DEDUP_GEMMS)
        return self.gemms


@dataclasses.dataclass
class FocusStats:
    num_visual: list[int] = dataclasses.field(default_factory=list)  # grid tokens per sample (original)
    keep_per_stage: list[list[int]] = dataclasses.field(default_factory=list)  # per selected layer, per sample
    visual_per_layer: list[int] = dataclasses.field(default_factory=list)  # sample 0: grid tokens entering each layer
    tokens_per_layer: list[int] = dataclasses.field(default_factory=list)  # sample 0: sequence length per layer
    # (gemm, layer) -> [similar vectors, zero vectors, vectors of the original grid]
    sic_counts: dict = dataclasses.field(default_factory=dict)
    # (gemm, layer) -> [rows computed, rows of the input] (token_dedup; every point, deduplicated or not)
    dedup_rows: dict = dataclasses.field(default_factory=dict)
    # selected layer -> [rows its MLP computed, rows of the layer] (placement="mid_layer": the MLP of a selected
    # layer runs on the rows that survive its SEC step only)
    mlp_rows: dict = dataclasses.field(default_factory=dict)
    # (gemm, layer) -> [duplicate rows found, rows of the input] (token_dedup; the points that were matched; an
    # estimate from `similarity.SAMPLE_ROWS` rows where that sample alone made the layer or its SEC stage run dense)
    duplicates: dict = dataclasses.field(default_factory=dict)
    cache_lengths: list[int] | None = None
    prefills: int = 0

    def sic_sparsity(self, gemm: str, layer: int) -> float:
        sim, zero, total = self.sic_counts.get((gemm, layer), (0, 0, 0))
        return (sim + zero) / total if total else 0.0

    def rows_removed(self, gemm: str) -> float:
        """Fraction of the GEMM's rows that were not computed (0 for layers that ran dense)."""
        done = [v for (g, _), v in self.dedup_rows.items() if g == gemm]
        total = sum(t for _, t in done)
        return 1.0 - sum(c for c, _ in done) / total if total else 0.0

    def duplicates_found(self, gemm: str) -> float:
        """Fraction of duplicate rows over the layers where the GEMM's input was matched (applied or not)."""
        done = [v for (g, _), v in self.duplicates.items() if g == gemm]
        total = sum(t for _, t in done)
        return sum(d for d, _ in done) / total if total else 0.0

    def gemm_rows(self) -> dict:
        """(gemm, layer) -> (rows computed, rows of the layer) for every GEMM that did not compute all the rows its
        layer's attention saw: the selected layers' MLPs (mid_layer) and the token_dedup points (sample-summed)."""
        rows = {}
        for layer, (computed, total) in self.mlp_rows.items():
            rows[("gate_proj", layer)] = rows[("down_proj", layer)] = (computed, total)
        for (gemm, layer), (computed, seen) in self.dedup_rows.items():
            # a point of a compacted MLP saw the surviving rows only: it counts against the layer's rows
            total = self.mlp_rows.get(layer, (seen, seen))[1] if gemm in MLP_GEMMS else seen
            rows[(gemm, layer)] = (computed, total)
        return rows

    @property
    def dense_layers(self) -> list[int]:
        """token_dedup: layers whose GEMMs all ran on every row (their stage, their first point or each point below
        `min_dedup_fraction`, or no duplicate)."""
        layers = sorted({l for _, l in self.dedup_rows})
        return [l for l in layers if all(c == t for (g, k), (c, t) in self.dedup_rows.items() if k == l)]


class TraceRecorder:
    """Sample 0 of the last prefill: kept sets per selected layer and neighbour codes per GEMM and layer."""

    def __init__(self):
        self.kept: dict[int, torch.Tensor] = {}  # selected layer -> int32 sorted grid indices
        self.codes: dict[tuple[str, int], torch.Tensor] = {}  # (gemm, layer) -> uint8 (rows, n_vec)
        self.roots: dict[tuple[str, int], torch.Tensor] = {}  # (gemm, layer) -> int64 (n_grid, n_vec) as computed
        self.widths: dict[str, int] = {}

    def clear(self) -> None:
        self.kept.clear(); self.codes.clear(); self.roots.clear()


class Site:
    """One dedup point of one layer, shared by the linear layers that read the same input."""

    def __init__(self, owner: "AttachedFocus", layer: int, gemm: str):
        self.owner, self.layer, self.gemm = owner, layer, gemm
        self._x = None
        self._prepared = None
        self._means = None

    def reset(self) -> None:
        self._x = self._prepared = self._means = None

    def run(self, inner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        owner = self.owner
        if not owner.sic_live or x.dim() != 3 or x.shape[1] < 2:
            return inner(x)
        if self._x is not x:  # first linear layer of this input: match once, the others reuse it
            enter = getattr(owner, "enter", None)  # owners other than Focus (CMC) only have `prepare`
            if enter is not None:
                enter(self)
            self._x, self._means = x, None
            self._prepared = getattr(owner, "prepare_site", owner.prepare)(x, self.layer, self.gemm)
        prep = self._prepared
        if prep is None:
            return inner(x)
        if isinstance(prep, torch.Tensor):
            return inner(prep)
        B, L, C = x.shape
        x2d = x.reshape(B * L, C)
        if self._means is None:
            self._means = S.group_means_rows(x2d, prep)
        y = S.dedup_linear(inner, x2d, prep, self._means)
        return y.view(B, L, y.shape[-1])


class SICLinear(nn.Module):
    """A linear layer whose input passes through a `Site` (emulation or gather -> GEMM -> scatter)."""

    def __init__(self, inner: nn.Module, site: Site):
        super().__init__()
        self.inner = inner
        self.site = site

    @property
    def weight(self):
        return self.inner.weight

    @property
    def bias(self):
        return getattr(self.inner, "bias", None)

    def forward(self, x):
        return self.site.run(self.inner, x)


class AttachedFocus:
    def __init__(self, model, adapter, config: FocusConfig):
        T = adapter.num_layers
        for i, layer in enumerate(config.selected_layers):
            if layer > T - 2:
                raise ConfigError(f"selected_layers[{i}] must be in [0, {T - 2}] for this model ({T} decoder "
                                  f"layers; pruning acts from the next layer on), got {layer}")
        if adapter.sliding_window_layers():
            raise NotImplementedError("focus on models with sliding-window layers is not supported")
        self.config = config
        self.adapter = adapter
        self.stats = FocusStats()
        self.trace = TraceRecorder()
        self.layout_source = PromptLayout(adapter, config.frames, config.allow_text_only, "focus")
        self.pending: dict[int, torch.Tensor] = {}  # selected layer -> keep over current slots (mid_layer)
        self._mlp_plan: dict[int, _Compaction] = {}  # selected layer -> rows its MLP computes (mid_layer)
        self._mlp_live: _Compaction | None = None  # the compaction of the MLP running now
        self._kept: dict[int, list[int]] = {}  # stage -> kept visual tokens per sample (host, from the targets)
        self.sic_live = False
        self._targets: list[list[int]] = []
        self._active: Site | None = None  # the site whose input is cached (released when the next one starts)
        self._layer_dedup: dict[int, bool] = {}  # token_dedup: layer -> its first point found enough duplicates
        self._neighbours_cache: list = []  # [(key, RowNeighbours)], the last two kept sets
        self._stage_dedup: dict[int, bool] = {}  # token_dedup: SEC stage -> its sampled estimate reached the cut
        self._stage_pending: dict[int, tuple] = {}  # fused: stage -> (_DeferredCount, rows, point) not read yet
        self._geometry = None  # (layout, device, similarity.GridGeometry) of the candidate tables
        self._counts: list = []  # token_dedup: ((gemm, layer), device tensor [similar, live nonzero], n_grid)
        self.steps = [DelegateStep(self, layer + 1, layer, tag=i) for i, layer in enumerate(config.selected_layers)]
        self.engine = None
        for step in self.steps:
            self.engine = PruningEngine.attach(model, adapter, step)
        if self.engine is None:  # no SEC stage: the engine still gives the prefill bookkeeping
            self.steps = [DelegateStep(self, 0, None, tag=None)]
            self.engine = PruningEngine.attach(model, adapter, self.steps[0])
        self._whole: tuple | None = None  # whole_mlp: (layer, plan, B, L) of the MLP running on its unique rows
        self._wrapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._sites: list[Site] = []
        self._handles = [adapter.text_model.register_forward_pre_hook(self._on_text_model, with_kwargs=True),
                         adapter.text_model.register_forward_hook(self._after_text_model)]
        for i, layer in enumerate(adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._count_layer(i), with_kwargs=True))
        if config.placement == "mid_layer":
            for layer in config.selected_layers:
                mlp = getattr(adapter.layers[layer], "mlp", None)
                if isinstance(mlp, nn.Module) and hasattr(mlp, "down_proj"):  # a row-wise (dense) MLP
                    self._handles += [mlp.register_forward_pre_hook(self._mlp_in(layer)),
                                      mlp.register_forward_hook(self._mlp_out(layer))]
        if config.sic_on:
            self._wrap_linears()
            if "query" in config.active_gemms:
                self.engine.hub.add_query_transform(self._query_transform)

    # ----------------------------------------------------------------- wrapping
    def _wrap_linears(self) -> None:
        gemms = self.config.active_gemms
        if self.config.whole_mlp:
            gemms = tuple(g for g in gemms if g not in MLP_GEMMS)
        for i, layer in enumerate(self.adapter.layers):
            attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
            if self.config.whole_mlp:
                if not (isinstance(mlp, nn.Module) and all(isinstance(getattr(mlp, n, None), nn.Module)
                                                           for n in ("gate_proj", "up_proj", "down_proj"))):
                    raise NotImplementedError(f"focus whole_mlp: layer {i} has no gate/up/down MLP")
                # after the mid-layer compaction's pre-hook, and undone before its scatter (prepend)
                self._handles += [mlp.register_forward_pre_hook(self._whole_mlp_in(i)),
                                  mlp.register_forward_hook(self._whole_mlp_out(i), prepend=True)]
            plan = {"q_proj": (attn, ("q_proj", "k_proj", "v_proj")), "o_proj": (attn, ("o_proj",)),
                    "gate_proj": (mlp, ("gate_proj", "up_proj")), "down_proj": (mlp, ("down_proj",))}
            for gemm, (parent, names) in plan.items():
                if gemm not in gemms:
                    continue
                if parent is None or not all(isinstance(getattr(parent, n, None), nn.Module) for n in names):
                    raise NotImplementedError(f"focus: layer {i} has no {'/'.join(names)} linear layers")
                site = Site(self, i, gemm)
                self._sites.append(site)
                for n in names:
                    inner = getattr(parent, n)
                    setattr(parent, n, SICLinear(inner, site))
                    self._wrapped.append((parent, n, inner))

    def remove(self) -> None:
        for parent, name, inner in reversed(self._wrapped):
            setattr(parent, name, inner)
        self._wrapped.clear()
        self.engine.hub.remove_query_transform(self._query_transform)
        for h in self._handles:
            h.remove()
        for step in self.steps:
            self.engine.detach(step)
        self.layout_source.remove()
        self._geometry = None

    # ----------------------------------------------------------------- prefill bookkeeping
    def _release(self) -> None:
        for site in self._sites:
            site.reset()
        self._active = None
        self._whole = None
        self._mlp_plan.clear()
        self._mlp_live = None
        self._kept.clear()
        self._layer_dedup.clear()
        self._stage_dedup.clear()
        self._stage_pending.clear()
        self._neighbours_cache.clear()
        self._counts.clear()

    def _on_text_model(self, module, args, kwargs):
        self.pending.clear()
        self.sic_live = False
        self._release()
        req = self.engine.req
        if req is None and not self.layout_source.ctx.fresh:
            return None
        if self.layout_source.ctx.fresh and self.layout_source.ctx.input_ids is not None:
            ids = self.layout_source.ctx.input_ids
            layout = self.layout_source.get(ids.shape[0], ids.shape[1], ids.device)
            if layout is not None and sum(layout.n_grid) and ids.shape[1] > 1:
                self.sic_live = self.config.sic_on
                self.trace.clear()
                self.stats.sic_counts, self.stats.dedup_rows, self.stats.duplicates = {}, {}, {}
                self.stats.mlp_rows = {}
                self.stats.visual_per_layer, self.stats.tokens_per_layer = [], []
                self.stats.num_visual = list(layout.n_grid)
                self.stats.keep_per_stage = [[] for _ in self.config.selected_layers]
        return None

    def _after_text_model(self, module, args, output):
        for stage in list(self._stage_pending):  # a stage of one layer: its decision was never needed
            self._resolve_stage(stage)
        if self._counts:  # the similarity counts of token_dedup: one host transfer per prefill
            values = torch.stack([t for _, t, _ in self._counts]).tolist()
            for ((key, _, n_grid), (similar, live_nonzero)) in zip(self._counts, values):
                prev = self.stats.sic_counts.get(key, [0, 0, 0])
                self.stats.sic_counts[key] = [prev[0] + similar, prev[1] + n_grid - live_nonzero, prev[2] + n_grid]
        self.sic_live = False
        self._release()
        return None

    def _count_layer(self, i: int):
        def hook(module, args, kwargs):
            if not self.layout_source.ctx.fresh or self.layout_source.layout is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] < 2 or len(self.stats.tokens_per_layer) != i:
                return None
            # layer i's pre-hook order: the engine shrank the input first (its hooks were registered first)
            req = self.engine.req
            if req is not None and req.kept.shape[1] == hidden.shape[1] and req.visual_counts:
                n = int(req.visual_counts[0])  # host-side count: no synchronisation per layer
            else:
                grid, _ = self.rows(i, mlp=False, B=hidden.shape[0], Lcur=hidden.shape[1], device=hidden.device)
                n = int((grid[0] >= 0).sum())
            self.stats.tokens_per_layer.append(int(hidden.shape[1]))
            self.stats.visual_per_layer.append(n)
            return None

        return hook

    # ----------------------------------------------------------------- SEC steps
    def step_plan(self, step, visual, counts) -> bool:
        if step.tag is None:
            self.stats.num_visual = list(counts)
            return bool(self.config.sic_on and sum(counts))
        alpha = self.config.alpha_list[step.tag]
        targets = [max(1, int(alpha * n)) if n else 0 for n in counts]
        if step.tag == 0:
            self._targets = []
        self._targets.append(targets)
        return any(k < n for k, n in zip(targets, counts)) or self.config.sic_on

    def _host_counts(self, req) -> bool:
        """True when the engine's host-side visual counts are this method's (only Focus's steps act on the
        request, all of them in place): keep counts and score rows then need no device-to-host transfer."""
        return bool(req.visual_counts) and all(getattr(s, "owner", None) is self for s in req.active_steps)

    def step_score(self, step, req, module, query, key, attention_mask, kwargs):
        if step.tag is None:
            return None
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        visual = current_visual(req)
        Lcur = visual.shape[1]
        idx = torch.arange(Lcur, device=query.device)
        row_start = (torch.where(visual, idx, -1).amax(1) + 1).clamp(max=Lcur - 1)
        host = self._host_counts(req)
        first = self._first_text_row(req, Lcur, query.shape[2]) if host else None
        if first is None:
            score = key_scores(query, key, attention_mask, scaling, "text_rows", "max", "max", row_start)
        else:
            score = text_row_max_scores(query, key, attention_mask, scaling, row_start, first)
        score = score[:, -Lcur:]
        counts = list(req.visual_counts) if host else visual.sum(1).tolist()
        targets = [min(t, int(c)) for t, c in zip(self._targets[step.tag], counts)]
        keep = topk_keep(score, visual, targets)  # exactly targets[b] of the visual slots per sample
        if host:
            self._kept[step.tag] = targets
        if self.config.placement == "mid_layer":
            pend = ~visual | keep
            self.pending[step.score_layer] = pend
            dropped = [int(c) - t for c, t in zip(counts, targets)]
            if min(dropped) > 0:
                self._mlp_plan[step.score_layer] = _Compaction.of(step.score_layer, pend, Lcur - min(dropped))
        return keep

    def _first_text_row(self, req, Lcur: int, Lq: int) -> int | None:
        """`min(row_start)` of `key_scores` known on the host: with one grid per sample and at least one of its
        tokens alive (SEC keeps >= 1), the rows after the last surviving grid token are the prompt's tokens
        after the grid (never pruned; slots are right-aligned). None when that does not hold."""
        layout = self.layout_source.layout
        if layout is None or req.length != layout.grid_index.shape[1] or any(len(g) > 1 for g in layout.grids):
            return None
        starts = []
        for b, grids in enumerate(layout.grids):
            if not grids or not req.visual_counts[b]:
                starts.append(0)  # no visual slot: row_start = 0
            else:
                g = grids[0]
                starts.append(Lcur - (req.length - g.start - g.size))
        return max(0, min(min(starts), Lcur - 1, Lq - 1))

    def step_select(self, step, req, hidden):
        if step.tag is None:
            return StepResult(None, list(req.visual_counts))
        keep_vis = req.scores.pop(step, None)
        if keep_vis is None:
            raise RuntimeError(f"focus: no scores were recorded at layer {step.score_layer}")
        self.pending.pop(step.score_layer, None)
        self._mlp_plan.pop(step.score_layer, None)
        visual = current_visual(req)
        counts = self._kept.pop(step.tag, None)
        if counts is not None and self._host_counts(req):
            before = list(req.visual_counts)
        else:
            counts, before = keep_vis.sum(1).tolist(), visual.sum(1).tolist()
        self.stats.keep_per_stage[step.tag] = counts
        if self.config.record_trace:
            grid = self.layout_source.layout.grid_index.gather(1, req.kept)[0]
            kept = grid[keep_vis[0]]
            self.trace.kept[step.score_layer] = torch.sort(kept).values.to(torch.int32).cpu()
        if all(k == n for k, n in zip(counts, before)):
            return StepResult(None, counts)
        return StepResult(~visual | keep_vis, counts)

    # ----------------------------------------------------------------- the selected layers' MLPs (mid_layer)
    def _mlp_in(self, layer: int):
        def hook(module, args):
            plan = self._mlp_plan.get(layer)
            if plan is None or not args or args[0].dim() != 3 or args[0].shape[1] != plan.length:
                return None
            self._mlp_live = plan
            x = args[0]
            B, L = plan.index.shape[0], plan.length
            self.stats.mlp_rows[layer] = [B * plan.index.shape[1], B * L]
            return (plan.gather(x),) + tuple(args[1:])

        return hook

    def _mlp_out(self, layer: int):
        def hook(module, args, output):
            plan, self._mlp_live = self._mlp_live, None
            if plan is None or plan.layer != layer:
                return None
            return plan.scatter(output)

        return hook

    def _whole_mlp_in(self, layer: int):
        """whole_mlp: the MLP input's gate/up point; when deduplicated the MLP runs on its U group means."""
        def hook(module, args):
            self._whole = None
            if not self.sic_live or not args or args[0].dim() != 3 or args[0].shape[1] < 2:
                return None
            if self._active is not None:  # the attention's cached site input is no longer needed
                self._active.reset()
                self._active = None
            x = args[0]
            B, L, C = x.shape
            plan = self.prepare_site(x, layer, "gate_proj")
            for stats in (self.stats.dedup_rows, self.stats.duplicates):
                if ("gate_proj", layer) in stats:
                    stats[("down_proj", layer)] = list(stats[("gate_proj", layer)])
            if plan is None:
                return None
            self._whole = (layer, plan, B, L)
            return (S.group_means_rows(x.reshape(B * L, C), plan)[None],) + tuple(args[1:])

        return hook

    def _whole_mlp_out(self, layer: int):
        def hook(module, args, output):
            whole, self._whole = self._whole, None
            if whole is None or whole[0] != layer:
                return None
            _, plan, B, L = whole
            return output[0].index_select(0, plan.expand).view(B, L, output.shape[-1])

        return hook

    def step_finish(self, step, req, cache_lengths) -> None:
        if step is self.steps[-1]:
            self.stats.cache_lengths = cache_lengths
            self.stats.prefills += 1

    # ----------------------------------------------------------------- SIC
    def rows(self, layer: int, mlp: bool, B: int, Lcur: int, device):
        """(grid index per current row or -1, alive per row) for a GEMM of `layer`."""
        plan = self._mlp_live if mlp else None
        if plan is not None and plan.layer == layer and plan.index.shape[1] == Lcur:  # compacted MLP input
            grid, alive = self.rows(layer, mlp, B, plan.length, device)  # plan.length > Lcur: no recursion
            return grid.gather(1, plan.index), alive.gather(1, plan.index)
        layout = self.layout_source.layout
        req = self.engine.req
        if req is not None and req.kept.shape[1] == Lcur:
            grid = layout.grid_index.to(device).gather(1, req.kept)
            grid = torch.where(req.valid, grid, torch.full_like(grid, -1))
        else:
            grid = layout.grid_index.to(device)[:, :Lcur] if layout.grid_index.shape[1] == Lcur else \
                torch.full((B, Lcur), -1, dtype=torch.long, device=device)
        alive = grid >= 0
        if mlp and layer in self.pending:
            alive = alive & self.pending[layer]
        return grid, alive

    def enter(self, site: Site) -> None:
        """`site` starts on a new input: the previous site's cached input and means are no longer needed."""
        if self._active is not None and self._active is not site:
            self._active.reset()
        self._active = site

    def _table_key(self, layer: int, mlp: bool, B: int, Lcur: int) -> tuple:
        """What a candidate table depends on: the kept set (and mid-layer pending set / MLP compaction)."""
        req = self.engine.req
        pend = self.pending.get(layer) if mlp else None
        plan = self._mlp_live if mlp else None
        if req is not None and req.kept.shape[1] in (Lcur, getattr(plan, "length", -1)):
            return (req.kept, req.valid, pend, getattr(plan, "index", None), B, Lcur)
        return (self.layout_source.layout, None, pend, None, B, Lcur)

    def _cached_table(self, key: tuple) -> S.RowNeighbours | None:
        for k, nb in self._neighbours_cache:
            if all(a is b if not isinstance(a, int) else a == b for a, b in zip(k, key)):
                return nb
        return None

    def _candidates(self, layer: int, mlp: bool, B: int, Lcur: int, device) -> S.RowCandidates:
        """The uncompacted candidate table of the current rows (no host sync); the grids' geometry is built once
        per layout and device."""
        cfg = self.config
        grid, alive = self.rows(layer, mlp, B, Lcur, device)
        layout = self.layout_source.layout
        cached = self._geometry
        if cached is None or cached[0] is not layout or cached[1] != grid.device:
            geometry = S.GridGeometry.of(layout.grids, cfg.frame_block_size, cfg.block, grid.device)
            cached = self._geometry = (layout, grid.device, geometry)
        return S.row_candidates(grid, alive, layout.grids, frame_block=cfg.frame_block_size, block=cfg.block,
                                mask_row_wrap=cfg.mask_row_wrap, geometry=cached[2])

    def _store(self, key: tuple, nb: S.RowNeighbours) -> S.RowNeighbours:
        self._neighbours_cache = [(key, nb)] + self._neighbours_cache[:1]
        return nb

    def neighbours(self, layer: int, mlp: bool, B: int, Lcur: int, device) -> S.RowNeighbours:
        """Candidate table of the current rows, built once per kept set (and mid-layer pending set); one sync."""
        key = self._table_key(layer, mlp, B, Lcur)
        nb = self._cached_table(key)
        if nb is None:
            c = self._candidates(layer, mlp, B, Lcur, device)
            P, most = c.counts.tolist()  # the host sync of a kept set
            nb = self._store(key, c.table(P, most, self.config.gemm_m_size))
        return nb

    def _stage_sample(self, x2d: torch.Tensor, layer: int, mlp: bool, B: int, L: int):
        """The first point of a SEC stage: its candidate table and the sampled duplicate estimate, with one host
        sync for both ([P, most, duplicates in the sample]). Returns (table, estimate, exact): the table is None
        when the estimate is below `min_dedup_fraction` (not compacted: nothing of the stage will be matched);
        `exact` = (duplicates, codes, nonzero rows) when the sample was every row with a candidate
        (P <= SAMPLE_ROWS): the point's full matching is then known without another sync."""
        cfg = self.config
        M = x2d.shape[0]
        key = self._table_key(layer, mlp, B, L)
        nb = self._cached_table(key)
        if nb is not None:  # the kept set did not change since the last table
            return nb, self._layer_sample(x2d, nb), None
        c = self._candidates(layer, mlp, B, L, x2d.device)
        found, code, nonzero = S.sample_duplicates(x2d, c, threshold=cfg.similarity_threshold,
                                                   m_size=cfg.gemm_m_size)
        P, most, found = torch.cat([c.counts, found[None]]).tolist()  # the stage's one host sync
        exact = P <= S.SAMPLE_ROWS
        estimate = found / M if exact else found * P / (S.SAMPLE_ROWS * M)
        if estimate < cfg.min_dedup_fraction:
            return None, estimate, None
        nb = self._store(key, c.table(P, most, cfg.gemm_m_size))
        return nb, estimate, (found, code[:P], nonzero) if exact else None

    def _layer_sample(self, x2d: torch.Tensor, nb: S.RowNeighbours) -> float | None:
        """A layer's sampled duplicate estimate (one sync); None when the table is small enough to be matched in
        full (the full matching decides)."""
        if nb.sample is None:
            return None
        cfg = self.config
        found, matched, _ = S.count_duplicates(x2d, nb, threshold=cfg.similarity_threshold, m_size=cfg.gemm_m_size)
        return int(found) * nb.rows.numel() / (matched * x2d.shape[0])  # host sync

    def prepare_site(self, x: torch.Tensor, layer: int, gemm: str):
        """What a GEMM point runs on: the mean-replaced input (emulate), a DedupPlan, or None (dense).

        token_dedup with `min_dedup_fraction` > 0 decides in two steps: the first point of each SEC stage (the
        layers between two selected layers) estimates its duplicate fraction on a sample, in the same host sync
        as the stage's candidate table; below `min_dedup_fraction` every GEMM of the stage runs dense with no
        further matching, table or sync. In a stage above it, the first point of each layer decides for its
        layer (the stage's first layer reuses the stage's estimate), then every point of a deduplicating layer
        is matched in full and deduplicated when its exact fraction reaches the threshold (one sync each)."""
        cfg = self.config
        if cfg.sic_mode == "emulate":
            return self.prepare(x, layer, gemm)
        B, L, C = x.shape
        M = B * L
        key = (gemm, layer)
        if cfg.record_trace:  # the full-grid path records codes and roots in grid space
            plan = self.prepare(x, layer, gemm)
            return self._dedup_or_dense(key, plan.removed, M, plan)
        stage = bisect.bisect_left(cfg.selected_layers, layer)  # SEC stages applied before this layer
        if M < cfg.min_dedup_rows:
            self.stats.dedup_rows[key] = [M, M]
            return None
        if stage in self._stage_pending:
            self._resolve_stage(stage)
        if cfg.dedup_stages == "until_dense" and stage not in self._stage_dedup:
            for earlier in [s for s in self._stage_pending if s < stage]:
                self._resolve_stage(earlier)
            if any(d is False for s, d in self._stage_dedup.items() if s < stage):
                self._stage_dedup[stage] = False  # unmatched: duplicate fractions fall with depth
        if self._layer_dedup.get(layer) is False or self._stage_dedup.get(stage) is False:
            self._layer_dedup[layer] = False
            self.stats.dedup_rows[key] = [M, M]
            return None
        mlp = gemm in MLP_GEMMS
        x2d = x.reshape(M, C)
        if self._fused(x2d):
            return self._prepare_fused(x2d, key, stage, mlp, B, L)
        exact = None
        if layer not in self._layer_dedup and cfg.min_dedup_fraction > 0:  # the layer's first point
            if stage not in self._stage_dedup:
                nb, estimate, exact = self._stage_sample(x2d, layer, mlp, B, L)
                self._stage_dedup[stage] = estimate is None or estimate >= cfg.min_dedup_fraction
            else:
                nb = self.neighbours(layer, mlp, B, L, x.device)
                estimate = self._layer_sample(x2d, nb)
            if estimate is not None and estimate < cfg.min_dedup_fraction:
                self._layer_dedup[layer] = False
                self.stats.duplicates[key] = [round(estimate * M), M]
                self.stats.dedup_rows[key] = [M, M]
                return None
        else:
            nb = self.neighbours(layer, mlp, B, L, x.device)
        m = S.match_rows(x2d, nb, threshold=cfg.similarity_threshold, m_size=cfg.gemm_m_size,
                         code=exact[1] if exact else None, nonzero=exact[2] if exact else None)
        count = m.removed()
        self._counts.append((key, torch.stack([count, (nb.live & m.nonzero).sum()]), nb.n_grid))
        draft = S.PlanDraft.of(m.root)  # queued before the sync: after it only the gathers and the GEMM
        removed = exact[0] if exact else int(count)  # the host sync of this point (the plan's shapes need it)
        return self._dedup_or_dense(key, removed, M, draft=draft)

    def _prepare_fused(self, x2d: torch.Tensor, key: tuple, stage: int, mlp: bool, B: int, L: int):
        """token_dedup with the Triton kernels: every point is matched in full (one pass over its input), so no
        sampling: the exact duplicate fraction of a stage's first point decides for the stage (and its layer),
        that of a layer's first point for the layer. One host sync per matched point. The plan and the group
        means (sized for every row, the first U filled) are queued before it, so that the GEMM on the unique
        rows is launched right after it, with no GPU idle while the host prepares (wasted work when the point
        then runs dense: one read of its input)."""
        cfg = self.config
        layer, M = key[1], x2d.shape[0]
        table = self._fused_candidates(layer, mlp, B, L, x2d.device)
        root, count = DK.choose_roots(x2d, table.rows, table.cand, cfg.similarity_threshold)
        self._counts.append((key, torch.stack([count, table.live]), table.n_grid))
        if stage not in self._stage_dedup and stage > 0 and cfg.min_dedup_fraction > 0:
            # decided one layer later, without draining the GPU's queue: a sync here would throw away the lead
            # the host has built (the later stages' small GEMMs then cannot hide its launch times)
            self._stage_pending[stage] = (_DeferredCount(count), M, key)
            self._layer_dedup[layer] = False
            self.stats.dedup_rows[key] = [M, M]
            return None
        draft = S.PlanDraft.of(root, lists=True)
        means = DK.group_means(x2d, draft.members, draft.starts, draft.sizes, M)
        removed = int(count)  # the host sync of this point
        if stage not in self._stage_dedup:
            self._stage_dedup[stage] = removed / M >= cfg.min_dedup_fraction
        plan = self._dedup_or_dense(key, removed, M, draft=draft)
        if plan is not None:
            plan.means = means[:M - removed]
        return plan

    def _resolve_stage(self, stage: int) -> None:
        deferred, M, key = self._stage_pending.pop(stage)
        removed = deferred.read()
        self.stats.duplicates[key] = [removed, M]
        self._stage_dedup[stage] = removed / M >= self.config.min_dedup_fraction

    def _fused_candidates(self, layer: int, mlp: bool, B: int, L: int, device) -> S.FusedCandidates:
        """The fused matching's candidate table of the current rows, built once per kept set (no host sync)."""
        key = self._table_key(layer, mlp, B, L)
        table = self._cached_table(key)
        if table is None:
            table = self._store(key, S.FusedCandidates.of(self._candidates(layer, mlp, B, L, device),
                                                          self.config.gemm_m_size))
        return table

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether this prefill's token_dedup runs the Triton kernels (`fused_kernels`; None: where usable)."""
        want = self.config.fused_kernels
        if want and not DK.usable(x):
            raise RuntimeError(f"focus: fused_kernels=True needs a CUDA device (or TRITON_INTERPRET=1), got a "
                               f"{x.device.type} tensor (fused_kernels=None falls back to the eager kernels)")
        return (x.is_cuda and DK.usable(x)) if want is None else want

    def _dedup_or_dense(self, key: tuple, removed: int, M: int, plan=None, draft=None):
        """A matched point: deduplicated when its exact duplicate fraction reaches `min_dedup_fraction` and its
        layer's first point did; the plan's shapes come from `removed` (no sync)."""
        gemm, layer = key
        self.stats.duplicates[key] = [removed, M]
        worth = removed / M >= self.config.min_dedup_fraction
        layer_ok = self._layer_dedup.setdefault(layer, worth)  # the first point of a layer decides for it
        if not (layer_ok and worth and removed > 0):
            self.stats.dedup_rows[key] = [M, M]
            return None
        if plan is None:
            plan = draft.finish(removed)
        self.stats.dedup_rows[key] = [M - removed, M]
        return plan

    def prepare(self, x: torch.Tensor, layer: int, gemm: str):
        """Full-grid path (emulation; token_dedup with `record_trace`): the mean-replaced input (emulation) or a
        DedupPlan over the flattened rows (token_dedup)."""
        cfg = self.config
        B, Lcur, C = x.shape
        grid, alive = self.rows(layer, gemm in MLP_GEMMS, B, Lcur, x.device)
        layout = self.layout_source.layout
        emulate = cfg.sic_mode == "emulate"
        out = x.clone() if emulate else None
        root_rows = None if emulate else torch.arange(B * Lcur, device=x.device)
        counts = [0, 0, 0]
        for b in range(B):
            live = (alive[b]).nonzero().flatten()
            n = layout.n_grid[b]
            if n == 0:
                continue
            G = x.new_zeros(n, C)
            G[grid[b, live]] = x[b, live]
            offset = 0
            codes, roots, new = [], [], []
            for g in layout.grids[b]:
                sub = G[offset:offset + g.size]
                m = S.match_vectors(sub, g.frames, g.height, g.width, vector_size=cfg.vector,
                                    threshold=cfg.similarity_threshold, frame_block=cfg.frame_block_size,
                                    block=cfg.block, m_size=cfg.gemm_m_size, mask_row_wrap=cfg.mask_row_wrap)
                codes.append(m.code)
                roots.append(m.root + offset)
                if emulate:
                    new.append(S.group_mean(sub, m, cfg.vector))
                offset += g.size
            code = torch.cat(codes)
            root = torch.cat(roots)
            counts[0] += int(((code > 0) & (code != S.ZERO_CODE)).sum())
            counts[1] += int((code == S.ZERO_CODE).sum())
            counts[2] += code.numel()
            if emulate:
                out[b, live] = torch.cat(new)[grid[b, live]]
            else:
                row_of = torch.full((n,), -1, dtype=torch.long, device=x.device)
                row_of[grid[b, live]] = live
                root_rows[b * Lcur + live] = b * Lcur + row_of[root[grid[b, live], 0]]
            if b == 0 and cfg.record_trace:
                stored = torch.sort(grid[b, live]).values
                self.trace.codes[(gemm, layer)] = code[stored].cpu()
                self.trace.roots[(gemm, layer)] = root.cpu()
                self.trace.widths[gemm] = C
        prev = self.stats.sic_counts.get((gemm, layer), [0, 0, 0])
        self.stats.sic_counts[(gemm, layer)] = [p + c for p, c in zip(prev, counts)]
        if emulate:
            return out
        plan = S.dedup_plan(root_rows)
        self.stats.dedup_rows[(gemm, layer)] = [plan.unique.numel(), B * Lcur]
        return plan

    def _query_transform(self, module, query, kwargs):
        if not self.sic_live or query.shape[2] < 2:
            return query
        B, H, L, D = query.shape
        flat = query.transpose(1, 2).reshape(B, L, H * D)
        out = self.prepare(flat, module.layer_idx, "query")
        return out.view(B, L, H, D).transpose(1, 2)


class _DeferredCount:
    """A 0-dim device count read later without waiting for the work queued after it: copied to pinned host
    memory behind an event (CPU tensors: read directly)."""

    def __init__(self, count: torch.Tensor):
        self._event = None
        self._value = count
        if count.is_cuda:
            self._value = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._value.copy_(count, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def read(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._value)


class _Compaction:
    """Rows a selected layer's MLP computes: every slot but the visual tokens its SEC step drops (kept slots in
    order first; in a ragged batch a sample with fewer drops also computes some of its dropped rows, harmlessly:
    the next layer's input drops them). The MLP output of the other rows is zero (they are dropped next)."""

    def __init__(self, layer: int, index: torch.Tensor, length: int):
        self.layer, self.index, self.length = layer, index, length

    @classmethod
    def of(cls, layer: int, keep: torch.Tensor, rows: int) -> "_Compaction":
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :rows]
        return cls(layer, order, keep.shape[1])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return x.index_select(1, self.index[0])
        return x.gather(1, self.index[..., None].expand(-1, -1, x.shape[-1]))

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        full = y.new_zeros(y.shape[0], self.length, y.shape[-1])
        if y.shape[0] == 1:
            return full.index_copy_(1, self.index[0], y)
        return full.scatter_(1, self.index[..., None].expand(-1, -1, y.shape[-1]), y)


def text_row_max_scores(query, key, attention_mask, scaling: float, row_start: torch.Tensor,
                        first: int) -> torch.Tensor:
    """`key_scores(..., "text_rows", "max", "max", row_start)` with its first row `first` (= min(row_start))
    given by the caller, so no device-to-host transfer: the same chunks, the same arithmetic, bit-identical."""
    return key_scores(query, key, attention_mask, scaling, "text_rows", "max", "max", row_start, first=first)


@register_method("focus", family="video", config_cls=FocusConfig,
                 summary="Focus: prompt-guided progressive pruning + similarity concentration of GEMM inputs")
def attach_focus(model, adapter, config: FocusConfig) -> AttachedFocus:
    return AttachedFocus(model, adapter, config)
