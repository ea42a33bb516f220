"""Focus's `sic_mode="token_dedup"` scheduling: which GEMM points are matched and deduplicated, and when the host
reads the counts that decide it (docs/video.md, "token_dedup cost model" and "Fused kernels").

The candidate table of the current rows is built once per kept set (SEC stage), the matching once per GEMM input
(q/k/v and gate/up share theirs, group means included) with one host sync. `min_dedup_fraction` (gather/scatter
only pay off above a break-even fraction) decides per SEC stage first: the stage's first dedup point estimates
its duplicate fraction on at most `similarity.SAMPLE_ROWS` rows, read in the same host sync as the stage's
candidate table; below the cut every GEMM of the stage (the layers up to the next selected layer) runs densely,
with no other matching, table or sync. In a stage above it, the first point of each layer decides for its layer
(sampled likewise, one sync), and the points of a deciding layer are matched in full and deduplicated when their
own exact fraction reaches the cut. On CUDA (`fused_kernels`, default on where Triton imports) the matching and
the group means are Triton kernels (`dedup_kernels`), every point is matched in full and decides on its exact
fraction, plan and means are queued before the point's sync, and SEC stages after the first are decided one
layer late without draining the GPU's queue. `min_dedup_rows` and `dedup_stages="until_dense"` skip points
where a host sync costs more than it saves.
"""
from __future__ import annotations

import bisect

import torch

from .. import dedup_kernels as DK
from .. import similarity as S
from .config import MLP_GEMMS


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


class CandidateTables:
    """Candidate tables of the current rows (which row is each token's previous-frame neighbour after pruning),
    kept for the last two kept sets; the grids' geometry is built once per layout and device. `rows` and
    `rows_key` are SEC's: the grid index of each current row, and what it depends on."""

    def __init__(self, config, layout_source, rows, rows_key):
        self.config, self.layout_source, self.rows, self.key = config, layout_source, rows, rows_key
        self._cache: list = []  # [(key, table)], the last two kept sets
        self._geometry = None  # (layout, device, similarity.GridGeometry)

    def reset(self) -> None:
        self._cache.clear()

    def forget(self) -> None:
        self._cache.clear()
        self._geometry = None

    def cached(self, key: tuple):
        for k, nb in self._cache:
            if all(a is b if not isinstance(a, int) else a == b for a, b in zip(k, key)):
                return nb
        return None

    def store(self, key: tuple, nb):
        self._cache = [(key, nb)] + self._cache[:1]
        return nb

    def candidates(self, layer: int, mlp: bool, B: int, Lcur: int, device) -> S.RowCandidates:
        """The uncompacted candidate table of the current rows (no host sync)."""
        cfg = self.config
        grid, alive = self.rows(layer, mlp, B, Lcur, device)
        layout = self.layout_source.layout
        cached = self._geometry
        if cached is None or cached[0] is not layout or cached[1] != grid.device:
            geometry = S.GridGeometry.of(layout.grids, cfg.frame_block_size, cfg.block, grid.device)
            cached = self._geometry = (layout, grid.device, geometry)
        return S.row_candidates(grid, alive, layout.grids, frame_block=cfg.frame_block_size, block=cfg.block,
                                mask_row_wrap=cfg.mask_row_wrap, geometry=cached[2])

    def neighbours(self, layer: int, mlp: bool, B: int, Lcur: int, device) -> S.RowNeighbours:
        """The eager matching's table, built once per kept set (and mid-layer pending set); one sync."""
        key = self.key(layer, mlp, B, Lcur)
        nb = self.cached(key)
        if nb is None:
            c = self.candidates(layer, mlp, B, Lcur, device)
            P, most = c.counts.tolist()  # the host sync of a kept set
            nb = self.store(key, c.table(P, most, self.config.gemm_m_size))
        return nb

    def fused(self, layer: int, mlp: bool, B: int, L: int, device) -> S.FusedCandidates:
        """The fused matching's table, built once per kept set (no host sync)."""
        key = self.key(layer, mlp, B, L)
        table = self.cached(key)
        if table is None:
            table = self.store(key, S.FusedCandidates.of(self.candidates(layer, mlp, B, L, device),
                                                         self.config.gemm_m_size))
        return table


class DedupSchedule:
    """token_dedup's decisions for one prefill: per SEC stage and per layer whether it deduplicates, the fused
    path's stage counts not read yet, and the similarity counts read once at the end (`finish`).
    `grid` is the full-grid path (with `record_trace`, which records codes and roots in grid space)."""

    def __init__(self, config, stats, tables: CandidateTables, grid):
        self.config, self.stats, self.tables, self.grid = config, stats, tables, grid
        self.layer_dedup: dict[int, bool] = {}  # layer -> its first point found enough duplicates
        self.stage_dedup: dict[int, bool] = {}  # SEC stage -> its first point found enough duplicates
        self.stage_pending: dict[int, tuple] = {}  # fused: stage -> (_DeferredCount, rows, point) not read yet
        self.counts: list = []  # ((gemm, layer), device tensor [similar, live nonzero], n_grid)

    def reset(self) -> None:
        self.layer_dedup.clear()
        self.stage_dedup.clear()
        self.stage_pending.clear()
        self.counts.clear()
        self.tables.reset()

    def finish(self) -> None:
        """End of a prefill: the stage counts never needed are read, the similarity counts are summed into
        `stats.sic_counts` (one host transfer per prefill)."""
        for stage in list(self.stage_pending):  # a stage of one layer: its decision was never needed
            self._resolve_stage(stage)
        if self.counts:
            values = torch.stack([t for _, t, _ in self.counts]).tolist()
            for ((key, _, n_grid), (similar, live_nonzero)) in zip(self.counts, values):
                prev = self.stats.sic_counts.get(key, [0, 0, 0])
                self.stats.sic_counts[key] = [prev[0] + similar, prev[1] + n_grid - live_nonzero, prev[2] + n_grid]

    def prepare(self, x: torch.Tensor, layer: int, gemm: str):
        """What a GEMM point runs on: a DedupPlan, or None (dense).

        With `min_dedup_fraction` > 0 it decides in two steps: the first point of each SEC stage (the layers
        between two selected layers) estimates its duplicate fraction on a sample, in the same host sync as the
        stage's candidate table; below `min_dedup_fraction` every GEMM of the stage runs dense with no further
        matching, table or sync. In a stage above it, the first point of each layer decides for its layer (the
        stage's first layer reuses the stage's estimate), then every point of a deduplicating layer is matched
        in full and deduplicated when its exact fraction reaches the threshold (one sync each)."""
        cfg = self.config
        B, L, C = x.shape
        M = B * L
        key = (gemm, layer)
        if cfg.record_trace:  # the full-grid path records codes and roots in grid space
            plan = self.grid(x, layer, gemm)
            return self._dedup_or_dense(key, plan.removed, M, plan)
        stage = bisect.bisect_left(cfg.selected_layers, layer)  # SEC stages applied before this layer
        if M < cfg.min_dedup_rows:
            self.stats.dedup_rows[key] = [M, M]
            return None
        if stage in self.stage_pending:
            self._resolve_stage(stage)
        if cfg.dedup_stages == "until_dense" and stage not in self.stage_dedup:
            for earlier in [s for s in self.stage_pending if s < stage]:
                self._resolve_stage(earlier)
            if any(d is False for s, d in self.stage_dedup.items() if s < stage):
                self.stage_dedup[stage] = False  # unmatched: duplicate fractions fall with depth
        if self.layer_dedup.get(layer) is False or self.stage_dedup.get(stage) is False:
            self.layer_dedup[layer] = False
            self.stats.dedup_rows[key] = [M, M]
            return None
        mlp = gemm in MLP_GEMMS
        x2d = x.reshape(M, C)
        if self._fused(x2d):
            return self._prepare_fused(x2d, key, stage, mlp, B, L)
        exact = None
        if layer not in self.layer_dedup and cfg.min_dedup_fraction > 0:  # the layer's first point
            if stage not in self.stage_dedup:
                nb, estimate, exact = self._stage_sample(x2d, layer, mlp, B, L)
                self.stage_dedup[stage] = estimate is None or estimate >= cfg.min_dedup_fraction
            else:
                nb = self.tables.neighbours(layer, mlp, B, L, x.device)
                estimate = self._layer_sample(x2d, nb)
            if estimate is not None and estimate < cfg.min_dedup_fraction:
                self.layer_dedup[layer] = False
                self.stats.duplicates[key] = [round(estimate * M), M]
                self.stats.dedup_rows[key] = [M, M]
                return None
        else:
            nb = self.tables.neighbours(layer, mlp, B, L, x.device)
        m = S.match_rows(x2d, nb, threshold=cfg.similarity_threshold, m_size=cfg.gemm_m_size,
                         code=exact[1] if exact else None, nonzero=exact[2] if exact else None)
        count = m.removed()
        self.counts.append((key, torch.stack([count, (nb.live & m.nonzero).sum()]), nb.n_grid))
        draft = S.PlanDraft.of(m.root)  # queued before the sync: after it only the gathers and the GEMM
        removed = exact[0] if exact else int(count)  # the host sync of this point (the plan's shapes need it)
        return self._dedup_or_dense(key, removed, M, draft=draft)

    def _stage_sample(self, x2d: torch.Tensor, layer: int, mlp: bool, B: int, L: int):
        """The first point of a SEC stage: its candidate table and the sampled duplicate estimate, with one host
        sync for both ([P, most, duplicates in the sample]). Returns (table, estimate, exact): the table is None
        when the estimate is below `min_dedup_fraction` (not compacted: nothing of the stage will be matched);
        `exact` = (duplicates, codes, nonzero rows) when the sample was every row with a candidate
        (P <= SAMPLE_ROWS): the point's full matching is then known without another sync."""
        cfg = self.config
        M = x2d.shape[0]
        key = self.tables.key(layer, mlp, B, L)
        nb = self.tables.cached(key)
        if nb is not None:  # the kept set did not change since the last table
            return nb, self._layer_sample(x2d, nb), None
        c = self.tables.candidates(layer, mlp, B, L, x2d.device)
        found, code, nonzero = S.sample_duplicates(x2d, c, threshold=cfg.similarity_threshold,
                                                   m_size=cfg.gemm_m_size)
        P, most, found = torch.cat([c.counts, found[None]]).tolist()  # the stage's one host sync
        exact = P <= S.SAMPLE_ROWS
        estimate = found / M if exact else found * P / (S.SAMPLE_ROWS * M)
        if estimate < cfg.min_dedup_fraction:
            return None, estimate, None
        nb = self.tables.store(key, c.table(P, most, cfg.gemm_m_size))
        return nb, estimate, (found, code[:P], nonzero) if exact else None

    def _layer_sample(self, x2d: torch.Tensor, nb: S.RowNeighbours) -> float | None:
        """A layer's sampled duplicate estimate (one sync); None when the table is small enough to be matched in
        full (the full matching decides)."""
        if nb.sample is None:
            return None
        cfg = self.config
        found, matched, _ = S.count_duplicates(x2d, nb, threshold=cfg.similarity_threshold, m_size=cfg.gemm_m_size)
        return int(found) * nb.rows.numel() / (matched * x2d.shape[0])  # host sync

    def _prepare_fused(self, x2d: torch.Tensor, key: tuple, stage: int, mlp: bool, B: int, L: int):
        """token_dedup with the Triton kernels: every point is matched in full (one pass over its input), so no
        sampling: the exact duplicate fraction of a stage's first point decides for the stage (and its layer),
        that of a layer's first point for the layer. One host sync per matched point. The plan and the group
        means (sized for every row, the first U filled) are queued before it, so that the GEMM on the unique
        rows is launched right after it, with no GPU idle while the host prepares (wasted work when the point
        then runs dense: one read of its input)."""
        cfg = self.config
        layer, M = key[1], x2d.shape[0]
        table = self.tables.fused(layer, mlp, B, L, x2d.device)
        root, count = DK.choose_roots(x2d, table.rows, table.cand, cfg.similarity_threshold)
        self.counts.append((key, torch.stack([count, table.live]), table.n_grid))
        if stage not in self.stage_dedup and stage > 0 and cfg.min_dedup_fraction > 0:
            # decided one layer later, without draining the GPU's queue: a sync here would throw away the lead
            # the host has built (the later stages' small GEMMs then cannot hide its launch times)
            self.stage_pending[stage] = (_DeferredCount(count), M, key)
            self.layer_dedup[layer] = False
            self.stats.dedup_rows[key] = [M, M]
            return None
        draft = S.PlanDraft.of(root, lists=True)
        means = DK.group_means(x2d, draft.members, draft.starts, draft.sizes, M)
        removed = int(count)  # the host sync of this point
        if stage not in self.stage_dedup:
            self.stage_dedup[stage] = removed / M >= cfg.min_dedup_fraction
        plan = self._dedup_or_dense(key, removed, M, draft=draft)
        if plan is not None:
            plan.means = means[:M - removed]
        return plan

    def _resolve_stage(self, stage: int) -> None:
        deferred, M, key = self.stage_pending.pop(stage)
        removed = deferred.read()
        self.stats.duplicates[key] = [removed, M]
        self.stage_dedup[stage] = removed / M >= self.config.min_dedup_fraction

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
        layer = key[1]
        self.stats.duplicates[key] = [removed, M]
        worth = removed / M >= self.config.min_dedup_fraction
        layer_ok = self.layer_dedup.setdefault(layer, worth)  # the first point of a layer decides for it
        if not (layer_ok and worth and removed > 0):
            self.stats.dedup_rows[key] = [M, M]
            return None
        if plan is None:
            plan = draft.finish(removed)
        self.stats.dedup_rows[key] = [M - removed, M]
        return plan
