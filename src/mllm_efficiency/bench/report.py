"""Results of benchmarks: JSON-safe values, output files, and the `mllm-eff bench` tables and plot."""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from .timing import markdown_table


def jsonable(x: Any) -> Any:
    """Tensors to lists, NaN/inf to None, keys to strings (recursively)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def write_outputs(result: dict, markdown: str, json_path: str | None, markdown_path: str | None) -> None:
    for path, text in ((json_path, json.dumps(jsonable(result), indent=1)), (markdown_path, markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            print(f"wrote {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ mllm-eff bench
def summary_rows(result: dict) -> list[dict]:
    """One flat row per entry for tables and plots."""
    rows = []
    for r in result["entries"]:
        if "error" in r:
            rows.append({"entry": r["entry"], "error": r["error"]})
            continue
        row = {"entry": r["entry"],
               "vision_ms": r["vision"]["median_ms"] if "vision" in r else None,
               "ttft_ms": r["ttft"]["median_ms"], "ttft_p10_ms": r["ttft"]["p10_ms"], "ttft_p90_ms": r["ttft"]["p90_ms"],
               "llm_prefill_ms": r["llm_prefill_ms"], "ttft_speedup": r.get("ttft_speedup"),
               "llm_prefill_speedup": r.get("llm_prefill_speedup"),
               "prefill_gflops": r["prefill_flops"] / 1e9, "flops_ratio": r.get("flops_ratio"),
               "kv_mib": r["kv_bytes"] / 2 ** 20, "kv_reduction": r.get("kv_reduction"),
               "stored_mean": statistics.fmean(r["stored_lengths"]) if r["stored_lengths"] else 0,
               "prefill_peak_gib": _gib(r.get("prefill_peak_bytes")),
               "first_logits_max_diff": r.get("first_logits_max_diff")}
        for key, tag in (("decode_hf", "hf"), ("decode_fast", "fast")):
            d = r.get(key)
            if d and "error" in d:
                row["error"] = f"{tag} decode: {d['error']}"
            elif d:
                row.update({f"{tag}_step_ms": d["step"]["median_ms"], f"{tag}_step_p10_ms": d["step"]["p10_ms"],
                            f"{tag}_step_p90_ms": d["step"]["p90_ms"], f"{tag}_tok_s": d["tokens_per_s"],
                            f"{tag}_roofline_ms": d["roofline_ms"], f"{tag}_over_roofline": d["measured_over_roofline"],
                            f"{tag}_steady_gib": _gib(d.get("steady_bytes")), f"{tag}_peak_gib": _gib(d.get("peak_bytes")),
                            f"{tag}_decode_speedup": d.get("speedup")})
        if "fast_over_hf_speedup" in r:
            row["fast_over_hf"] = r["fast_over_hf_speedup"]
        if "e2e_fast" in r:
            row.update(e2e_hf_ms=r["e2e_hf"]["median_ms"], e2e_fast_ms=r["e2e_fast"]["median_ms"],
                       e2e_fast_over_hf=r["e2e_fast_over_hf"])
        rows.append(row)
    return rows


def _gib(x) -> float | None:
    return None if x is None else x / 2 ** 30


_BENCH_COLUMNS = [
    ("entry", "entry"), ("vision_ms", "vision ms"), ("ttft_ms", "TTFT ms"), ("ttft_spread", "TTFT p10–p90"),
    ("ttft_speedup", "TTFT speedup"), ("llm_prefill_speedup", "LLM prefill speedup"),
    ("prefill_gflops", "prefill GFLOPs"), ("flops_ratio", "FLOPs ratio"), ("kv_mib", "KV MiB"),
    ("kv_reduction", "KV cut"), ("first_logits_max_diff", "logit Δ vs vanilla"), ("prefill_peak_gib", "prefill peak GiB"),
    ("hf_step_ms", "hf step ms"), ("hf_tok_s", "hf tok/s"), ("hf_over_roofline", "hf / roofline"),
    ("fast_step_ms", "fast step ms"), ("fast_tok_s", "fast tok/s"), ("fast_over_roofline", "fast / roofline"),
    ("fast_over_hf", "fast / hf speedup"), ("e2e_hf_ms", "generate ms (stock)"),
    ("e2e_fast_ms", "generate ms (fast path)"), ("e2e_fast_over_hf", "fast path / stock"), ("roofline_ms", "roofline ms"),
    ("steady_gib", "steady GiB"), ("peak_gib", "peak GiB"), ("error", "error"),
]


def bench_markdown(result: dict) -> str:
    """The `mllm-eff bench` result as markdown: a header naming model, prompt, device and bandwidth, then one
    row per entry (columns without any value are left out)."""

    rows = summary_rows(result)
    for r in rows:
        if "ttft_p10_ms" in r:
            r["ttft_spread"] = f"{r['ttft_p10_ms']:.2f}–{r['ttft_p90_ms']:.2f}"
        backend = "fast" if "fast_step_ms" in r else "hf"
        for key in ("roofline_ms", "steady_gib", "peak_gib"):
            if f"{backend}_{key}" in r:
                r[key] = r[f"{backend}_{key}"]
    cols = [c for c in _BENCH_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    s, p, bw = result["settings"], result["prompt"], result["bandwidth"]
    env = result["environment"]
    device = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    head = [f"**{s['model']}** ({result['model']['source']}), {s['dtype']}, attention {s['attn']}, on {device}",
            f"prompt: {p['shape']} = {p['length']} tokens per row ({p['visual_tokens']} visual), batch {p['batch']}",
            f"decode: {s['decode']}, {s['new_tokens']} timed steps after {s['decode_warmup']} warm-up; prefill: "
            f"{s['repeats']} timed calls after {s['warmup']} warm-up; medians (p10–p90)",
            f"bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (device copy); decode weights read "
            f"{result['model']['decode_weight_bytes_read'] / 2 ** 30:.2f} GiB per step; roofline = (weights + KV) / "
            "bandwidth",
            "FLOPs ratio and speedups: vanilla / entry; TTFT includes the vision encoder, LLM prefill = TTFT − vision."]
    return "\n".join(["- " + h for h in head]) + "\n\n" + markdown_table(rows, cols, float_digits=3) + "\n"


def bench_plot(result: dict, path) -> str | None:
    """Measured prefill speedup against the theoretical FLOPs ratio (y = x is the ideal). Returns a note instead
    of writing when matplotlib is missing or nothing can be plotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    pts = []
    for r in summary_rows(result):
        y = r.get("llm_prefill_speedup") if r.get("vision_ms") else r.get("ttft_speedup")
        if r.get("flops_ratio") is not None and y is not None:
            pts.append((r["flops_ratio"], y, r["entry"]))
    if not pts:
        return "no entry has both a FLOPs ratio and a measured speedup (is vanilla listed?): plot skipped"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    top = max(max(x for x, _, _ in pts), max(y for _, y, _ in pts), 1.0) * 1.1
    ax.plot([0, top], [0, top], "--", color="grey", label="speedup = FLOPs ratio")
    for x, y, label in pts:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("theoretical prefill FLOPs ratio (vanilla / method)")
    ax.set_ylabel("measured prefill speedup (vanilla / method)")
    ax.set_title(f"{result['settings']['model']}: {result['prompt']['shape']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_bench(result: dict, out_dir, stem: str = "bench", plot: bool = True) -> dict:
    """Write `<stem>.json`, `<stem>.md` and (if possible) `<stem>.png` into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = bench_markdown(result)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    note = None
    if plot:
        note = bench_plot(result, out / f"{stem}.png")
        if note is None:
            paths["plot"] = out / f"{stem}.png"
    if note:
        md += f"\n_{note}_\n"
        result = dict(result, plot_note=note)
    write_outputs(result, md, str(paths["json"]), str(paths["markdown"]))
    return paths
