"""Sparse traces of Focus (docs/video.md, "Sparse traces"): the lean format we write and the reference dict Focus's
simulator reads, plus the baselines' CSV files.

Lean trace = a directory with `meta.json` and `trace.safetensors`:
  sec/kept_after_l{l}   int32 sorted grid indices surviving the SEC step of selected layer l
  sic/{gemm}/l{l}       uint8 (rows, n_vec) neighbour codes of the rows that GEMM saw (0 unique,
                        1..7 offset in the spec's order, 255 all-zero), rows in grid order
Both files are written deterministically (sorted keys, no timestamps): the same seed gives the same bytes.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from . import similarity as S

TOOL_VERSION = "mllm-efficiency-video-trace/1"


def gemm_weights(hidden: int, intermediate: int, heads: int, kv_heads: int, n_visual: int) -> dict[str, float]:
    g = heads // kv_heads
    return {"q_proj": hidden ** 2 + 2 * hidden ** 2 / g, "o_proj": hidden ** 2, "query": hidden * n_visual,
            "gate_proj": 2 * hidden * intermediate, "down_proj": hidden * intermediate}


def weighted_sparsity(stats, weights: dict[str, float], num_layers: int) -> float:
    """Sparsity over layers and GEMMs weighted by each GEMM's weight size."""
    num = den = 0.0
    for (gemm, layer), (sim, zero, total) in stats.sic_counts.items():
        if total:
            num += weights[gemm] * (sim + zero) / total
            den += weights[gemm]
    return num / den if den else 0.0


def write_lean_trace(out_dir: str | Path, focus, meta: dict) -> Path:
    """Write the trace recorded by an attached Focus (config record_trace=True) of its last prefill."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = focus.trace
    tensors = {f"sec/kept_after_l{l}": t.contiguous() for l, t in rec.kept.items()}
    for (gemm, layer), codes in rec.codes.items():
        tensors[f"sic/{gemm}/l{layer}"] = codes.contiguous()
    save_file(dict(sorted(tensors.items())), str(out / "trace.safetensors"))
    cfg = focus.config
    layout = focus.layout_source.layout
    full = dict(meta)
    full.update({
        "layout": layout.describe(0), "vector_size": cfg.vector, "threshold": cfg.similarity_threshold,
        "tile_size": cfg.gemm_m_size, "block": [cfg.frame_block_size, cfg.block, cfg.block],
        "mask_row_wrap": cfg.mask_row_wrap, "selected_layers": list(cfg.selected_layers),
        "alpha_list": list(cfg.alpha_list), "num_layers": focus.adapter.num_layers,
        "gemm_widths": dict(sorted(rec.widths.items())),
        "sparsity": {f"{g}/l{l}": round(focus.stats.sic_sparsity(g, l), 6) for g, l in sorted(focus.stats.sic_counts)},
        "tool_version": TOOL_VERSION})
    (out / "meta.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
    return out


def read_lean_trace(trace_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    d = Path(trace_dir)
    return json.loads((d / "meta.json").read_text()), load_file(str(d / "trace.safetensors"))


def kept_at(meta: dict, tensors: dict, layer: int, mlp: bool, n_grid: int) -> torch.Tensor:
    """Grid indices a GEMM of `layer` saw: attention GEMMs the set at the layer input, MLP GEMMs the set
    after that layer's SEC step."""
    chosen = None
    for l in meta["selected_layers"]:
        if l < layer or (mlp and l == layer):
            key = f"sec/kept_after_l{l}"
            if key in tensors:
                chosen = tensors[key]
    return torch.arange(n_grid) if chosen is None else chosen.long()


def to_reference(trace_dir: str | Path) -> dict:
    """Rebuild Focus's simulator dict {mask_zero, mask_similar, group_idx: {gemm: [layers, 1, n_grid, n_vec]}}."""
    meta, tensors = read_lean_trace(trace_dir)
    grids = meta["layout"]["grids"]
    n_grid = meta["layout"]["n_visual"]
    T = meta["num_layers"]
    ft, s, _ = meta["block"]
    offsets = S.neighbour_offsets(ft, s)
    out = {"mask_zero": {}, "mask_similar": {}, "group_idx": {}}
    gemms = sorted({k.split("/")[1] for k in tensors if k.startswith("sic/")})
    for gemm in gemms:
        layers = [(int(k.rsplit("/l", 1)[1]), v) for k, v in tensors.items() if k.startswith(f"sic/{gemm}/")]
        n_vec = layers[0][1].shape[1]
        zero = torch.ones(T, 1, n_grid, n_vec, dtype=torch.bool)
        similar = torch.zeros(T, 1, n_grid, n_vec, dtype=torch.bool)
        group = (torch.arange(n_grid)[:, None] * n_vec + torch.arange(n_vec)[None]).to(torch.int32)
        group = group.expand(T, 1, n_grid, n_vec).clone()
        for layer, codes in layers:
            full = torch.full((n_grid, n_vec), S.ZERO_CODE, dtype=torch.uint8)
            full[kept_at(meta, tensors, layer, gemm in ("gate_proj", "down_proj"), n_grid)] = codes
            root = torch.empty(n_grid, n_vec, dtype=torch.long)
            o = 0
            for g in grids:
                size = g["frames"] * g["height"] * g["width"]
                root[o:o + size] = S.roots_from_codes(full[o:o + size], offsets, g["height"], g["width"]) + o
                o += size
            zero[layer, 0] = full == S.ZERO_CODE
            similar[layer, 0] = (full > 0) & (full != S.ZERO_CODE)
            group[layer, 0] = (root * n_vec + torch.arange(n_vec)[None]).to(torch.int32)
        out["mask_zero"][gemm], out["mask_similar"][gemm], out["group_idx"][gemm] = zero, similar, group
    return out


def append_csv(path: str | Path, header: list[str], row: list) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerow(row)


META_HEADER = ["Model", "Dataset", "Sequence length", "Num frames", "Num patches", "Median index"]
ADAPTIV_HEADER = ["Model", "Dataset", "Sparsity"]
CMC_HEADER = ["Model", "Dataset", "linear_sparsity", "query_sparsity", "attn_score_sparsity"]
