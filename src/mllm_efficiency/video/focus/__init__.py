"""Focus (arXiv 2512.14661): semantic concentration (SEC, prompt-guided progressive pruning) and similarity
concentration (SIC, vector-wise dedup of GEMM inputs). Spec: docs/video.md.

- `config`: `FocusConfig` (`sic_mode="off"` is SEC only; `sec_only=True` is its deprecated spelling);
- `sec`: the pruning steps on the shared pruning engine and the selected layers' MLP compaction;
- `sic`: the GEMM points (`Site`, `SICLinear`), the whole_mlp hooks, the Q transform and the full-grid matching;
- `dedup_schedule`: token_dedup's candidate tables, stage/layer decisions, fused path and host-sync timing;
- `stats`: `FocusStats`, `TraceRecorder`; `attached`: `AttachedFocus`, which puts them together per prefill.
"""
from __future__ import annotations

from ...registry import register_method
from .attached import AttachedFocus
from .config import DEDUP_GEMMS, GEMMS, MLP_GEMMS, FocusConfig
from .sec import SEC, _Compaction, text_row_max_scores  # noqa: F401  (_Compaction: tests)
from .sic import GridMatching, SICLinear, Site
from .stats import FocusStats, TraceRecorder

__all__ = ["DEDUP_GEMMS", "GEMMS", "MLP_GEMMS", "SEC", "AttachedFocus", "FocusConfig", "FocusStats",
           "GridMatching", "SICLinear", "Site", "TraceRecorder", "attach_focus", "text_row_max_scores"]


@register_method("focus", family="video", config_cls=FocusConfig,
                 summary="Focus: prompt-guided progressive pruning + similarity concentration of GEMM inputs")
def attach_focus(model, adapter, config: FocusConfig) -> AttachedFocus:
    return AttachedFocus(model, adapter, config)
