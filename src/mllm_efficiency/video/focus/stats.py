"""What a Focus prefill records: `FocusStats` (counts per stage, layer and GEMM point) and `TraceRecorder` (sample
0's kept sets and neighbour codes, for `video/trace.py`)."""
from __future__ import annotations

import dataclasses

import torch

from ..ratio import layer_removed_fraction
from .config import MLP_GEMMS


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
    num_layers: int = 0
    requested_ratio: float | None = None
    ratio_note: str | None = None

    @property
    def removed_fraction(self) -> float | None:
        """Sample 0, last prefill: 1 - grid tokens entering each layer summed over layers / (T * N) (SEC's pruning;
        SIC's deduplicated GEMM rows are not counted: `rows_removed`, `sic_sparsity`)."""
        return layer_removed_fraction(self.visual_per_layer, self.num_visual[0] if self.num_visual else 0,
                                      self.num_layers)

    def start_prefill(self, num_visual: list[int], stages: int) -> None:
        """A fresh prefill with visual tokens: new per-prefill records (earlier ones stay valid for their readers)."""
        self.sic_counts, self.dedup_rows, self.duplicates, self.mlp_rows = {}, {}, {}, {}
        self.visual_per_layer, self.tokens_per_layer = [], []
        self.num_visual = list(num_visual)
        self.keep_per_stage = [[] for _ in range(stages)]

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
