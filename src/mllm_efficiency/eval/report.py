"""`mllm-eff report RESULTS_DIR`: one markdown table (+ plots) across the lmms-eval runs found under a directory.

Each lmms-eval results JSON gives the task scores and the model_args (method, ratio, efficiency_log); the
efficiency summary written by the plugin beside its log gives prefill time, kept tokens, KV bytes and FLOPs.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..bench.timing import markdown_table

COLUMNS = [("task", "task"), ("model", "model"), ("method", "method"), ("ratio", "ratio removed"),
           ("kept", "kept fraction"), ("metric", "metric"), ("score", "score"), ("n", "samples"),
           ("prefill_ms", "prefill ms"), ("kept_tokens", "kept tokens"), ("kv_kib", "KV KiB"),
           ("tflops", "prefill TFLOPs")]


def _model_args(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in str(text or "").split(","))):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _method_label(args: dict) -> str:
    method = args.get("method", "vanilla") or "vanilla"
    extras = [f"{k}={v}" for k, v in args.items()
              if k not in ("pretrained", "method", "ratio", "efficiency_log", "device", "dtype", "device_map",
                           "attn_implementation", "batch_size", "max_new_tokens", "conv_template")]
    return method + (f" ({', '.join(extras)})" if extras else "")


def collect(results_dir: str | Path) -> list[dict]:
    """One row per (task, model, method, ratio) from lmms-eval's result files under `results_dir`; a run repeated
    into the same output folder keeps only its newest result (lmms-eval's file names start with the time)."""
    runs: dict[tuple, dict] = {}
    # oldest first, so a run's newer result replaces its older one below
    for path in sorted(Path(results_dir).rglob("*results*.json"), key=lambda p: (p.name, p.stat().st_mtime)):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "results" not in data:
            continue
        args = _model_args(data.get("config", {}).get("model_args", ""))
        ratio = float(args.get("ratio", 0) or 0)
        eff = {}
        log = args.get("efficiency_log")
        if log:
            summary = Path(log).with_suffix(".summary.json")
            if not summary.is_absolute():
                summary = Path.cwd() / summary
            if summary.is_file():
                eff = json.loads(summary.read_text())
        for task, res in data["results"].items():
            metrics = [(k.split(",")[0], v) for k, v in res.items()
                       if "," in k and "stderr" not in k and isinstance(v, (int, float))]
            if not metrics:
                continue
            metric, score = metrics[0]
            n = data.get("n-samples", {}).get(task, {}).get("effective")
            kv = eff.get("mean_kv_bytes")
            row = {"task": task, "model": Path(args.get("pretrained", "?").rstrip("/")).name,
                   "method": _method_label(args), "ratio": ratio, "kept": 1 - ratio, "metric": metric,
                   "score": float(score), "n": n, "prefill_ms": eff.get("mean_prefill_ms"),
                   "kept_tokens": eff.get("mean_kept_tokens"), "kv_kib": kv / 1024 if kv else None,
                   "tflops": eff.get("mean_prefill_tflops"), "source": str(path)}
            runs[(row["task"], row["model"], row["method"], row["ratio"])] = row
    rows = list(runs.values())
    rows.sort(key=lambda r: (r["task"], r["model"], r["method"], r["ratio"]))
    return rows


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS, float_digits=3)


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """accuracy vs kept fraction, and accuracy vs prefill time, one line per method (per task/model)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["model"]), []).append(r)
    for (task, model), rs in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        methods = sorted({r["method"] for r in rs})
        vanilla = [r for r in rs if r["method"].startswith("vanilla")]
        for m in methods:
            pts = sorted((r for r in rs if r["method"] == m), key=lambda r: r["kept"])
            if not m.startswith("vanilla"):
                pts = sorted(pts + vanilla, key=lambda r: r["kept"])
            axes[0].plot([r["kept"] for r in pts], [r["score"] for r in pts], marker="o", label=m)
            timed = [r for r in pts if r["prefill_ms"] is not None]
            axes[1].plot([r["prefill_ms"] for r in timed], [r["score"] for r in timed], marker="o", label=m)
        axes[0].set(xlabel="kept fraction (1 - ratio)", ylabel=rs[0]["metric"], title=f"{task} / {model}")
        axes[1].set(xlabel="mean prefill ms (measured)", ylabel=rs[0]["metric"])
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"report_{task}_{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, with_plots: bool = True) -> str:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"RESULTS_DIR {results_dir} is not a directory")
    out = Path(out_dir) if out_dir is not None else results_dir
    rows = collect(results_dir)
    if not rows:
        raise FileNotFoundError(f"no lmms-eval results (*results*.json) under {results_dir}")
    text = table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(f"# Evaluation report ({results_dir})\n\n{text}\n")
    (out / "report.json").write_text(json.dumps(rows, indent=1))
    if with_plots:
        for p in plots(rows, out):
            text += f"\nplot: {p}"
    return text
