"""`mllm-eff report RESULTS_DIR`: one markdown table (+ plots) across the lmms-eval runs found under a directory.

Each lmms-eval results JSON gives the task scores and the model_args (method, ratio, efficiency_log); the
efficiency summary written by the plugin beside its log gives prefill time, kept tokens, KV bytes and FLOPs.
A relative efficiency_log (as run_eval writes it, relative to where the run started) is found under RESULTS_DIR
by its trailing path components, so the report works from any directory and after the tree is moved.

Bad runs never stop the report: an unreadable results file, a `"config": null`, a non-numeric ratio are skipped,
an unreadable efficiency summary leaves that run's efficiency columns empty, and each is listed (`Collected.problems`).
An existing report.md is replaced only with `force=True` (`mllm-eff report --force`).

Loyalty (the seed benchmark's): with a vanilla run of the same task and model in the tree, each run's row gains the
fraction of the documents both runs answered whose answer (lmms-eval's filtered response) equals the vanilla
answer (`loyalty`) and whose per-sample score equals the vanilla score (`score_loyalty`), read from the
`*_samples_<task>.jsonl` files lmms-eval writes beside the results with --log_samples (run_eval always passes it).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..bench.timing import markdown_table

COLUMNS = [("task", "task"), ("model", "model"), ("method", "method"), ("ratio", "ratio removed"),
           ("kept", "kept fraction"), ("metric", "metric"), ("score", "score"), ("n", "samples"),
           ("prefill_ms", "prefill ms"), ("kept_tokens", "kept tokens"), ("kv_kib", "KV KiB"),
           ("tflops", "prefill TFLOPs"), ("loyalty", "loyalty"), ("score_loyalty", "score loyalty")]


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


@dataclasses.dataclass
class Collected:
    rows: list[dict]
    problems: list[str]  # "path: what is wrong (skipped | efficiency columns empty)"


def summary_path(log: str, results_dir: Path) -> Path | None:
    """The efficiency summary beside `log` (`efficiency_log` of a run): an absolute path that exists, else the
    longest trailing part of the path that exists under `results_dir`, else (a relative log) under the cwd."""
    summary = Path(log).with_suffix(".summary.json")
    if summary.is_absolute() and summary.is_file():
        return summary
    parts = summary.parts[1:] if summary.is_absolute() else summary.parts
    for i in range(len(parts)):
        candidate = results_dir.joinpath(*parts[i:])
        if candidate.is_file():
            return candidate
    if not summary.is_absolute() and summary.is_file():
        return summary.absolute()
    return None


def _read_summary(log: str, results_dir: Path, problems: list[str]) -> dict:
    path = summary_path(log, results_dir)
    if path is None:
        return {}
    try:
        eff = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable efficiency summary ({e}); efficiency columns left empty")
        return {}
    if not isinstance(eff, dict):
        problems.append(f"{path}: efficiency summary is not a JSON object; efficiency columns left empty")
        return {}
    return eff


def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def collect(results_dir: str | Path, only: set[Path] | None = None) -> list[dict]:
    """Rows of `collect_runs` (problems dropped)."""
    return collect_runs(results_dir, only).rows


def collect_runs(results_dir: str | Path, only: set[Path] | None = None) -> Collected:
    """One row per (task, model, method, ratio) from lmms-eval's result files under `results_dir` (only the files
    in `only`, when given); a run repeated into the same output folder keeps only its newest result (lmms-eval's
    file names start with the time). Files that cannot be read are skipped and listed in `problems`."""
    results_dir = Path(results_dir)
    only = None if only is None else {Path(p).absolute() for p in only}
    runs: dict[tuple, dict] = {}
    problems: list[str] = []
    # oldest first, so a run's newer result replaces its older one below
    for path in sorted(results_dir.rglob("*results*.json"), key=lambda p: (p.name, p.stat().st_mtime)):
        if only is not None and path.absolute() not in only:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{path}: not readable JSON ({e}); skipped")
            continue
        if not isinstance(data, dict) or "results" not in data:
            continue  # some other JSON whose name contains "results"
        config = data.get("config")
        if not isinstance(config, dict) or not isinstance(data["results"], dict):
            problems.append(f"{path}: no 'config' object with model_args (got {type(config).__name__}); skipped")
            continue
        args = _model_args(config.get("model_args", ""))
        try:
            ratio = float(args.get("ratio", 0) or 0)
            if not 0 <= ratio < 1:
                raise ValueError
        except ValueError:
            problems.append(f"{path}: model_args ratio={args.get('ratio')!r} is not a number in [0, 1); skipped")
            continue
        log = args.get("efficiency_log")
        eff = _read_summary(log, results_dir, problems) if log else {}
        n_samples = data.get("n-samples") if isinstance(data.get("n-samples"), dict) else {}
        for task, res in data["results"].items():
            if not isinstance(res, dict):
                problems.append(f"{path}: results[{task!r}] is not an object; skipped")
                continue
            metrics = [(k.split(",")[0], v) for k, v in res.items()
                       if "," in k and "stderr" not in k and _number(v) is not None and math.isfinite(v)]
            if not metrics:
                continue
            metric, score = metrics[0]
            samples = samples_path(path, task)
            task_n = n_samples.get(task)
            n = task_n.get("effective") if isinstance(task_n, dict) else None
            kv = _number(eff.get("mean_kv_bytes"))
            row = {"task": task, "model": Path(args.get("pretrained", "?").rstrip("/")).name,
                   "method": _method_label(args), "ratio": ratio, "kept": 1 - ratio, "metric": metric,
                   "score": float(score), "n": n, "prefill_ms": _number(eff.get("mean_prefill_ms")),
                   "kept_tokens": _number(eff.get("mean_kept_tokens")), "kv_kib": kv / 1024 if kv else None,
                   "tflops": _number(eff.get("mean_prefill_tflops")), "loyalty": None, "score_loyalty": None,
                   "loyal_n": None, "metrics": [m for m, _ in metrics], "source": str(path),
                   "samples": str(samples) if samples else None}
            runs[(row["task"], row["model"], row["method"], row["ratio"])] = row
    rows = list(runs.values())
    rows.sort(key=lambda r: (r["task"], r["model"], r["method"], r["ratio"]))
    add_loyalty(rows, problems)
    return Collected(rows, problems)


# ---------------------------------------------------------------------------------------------------- loyalty
def samples_path(results: Path, task: str) -> Path | None:
    """lmms-eval's per-sample file of `task` beside a results file (`<stamp>_results.json` ->
    `<stamp>_samples_<task>.jsonl`), if it was written (--log_samples)."""
    name = results.name
    if not name.endswith("_results.json"):
        return None
    path = results.with_name(f"{name[:-len('_results.json')]}_samples_{task}.jsonl")
    return path if path.is_file() else None


def _answer(sample: dict) -> str:
    resp = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(resp, list) and resp:
        resp = resp[0]
    return str(resp if resp is not None else "").strip()


def sample_score(sample: dict, metrics: list[str]):
    """The per-sample score of lmms-eval's process_results output: the first of the task's `metrics` present in
    the sample, as a number, or its "score" field (pope, mme, ocrbench, videomme), or whether MMMU's parsed
    prediction is the answer; None when the sample carries no comparable score (e.g. mmbench's GPT-judged dicts)."""
    for m in metrics:
        if m not in sample:
            continue
        v = sample[m]
        if isinstance(v, bool) or isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, dict):
            if _number(v.get("score")) is not None:
                return float(v["score"])
            if "parsed_pred" in v and "answer" in v:
                pred = v["parsed_pred"]
                pred = pred[0] if isinstance(pred, list) and pred else pred
                return float(str(pred).strip().lower() == str(v["answer"]).strip().lower())
        return None
    return None


def read_samples(path: str | Path) -> dict[int, dict]:
    """doc_id -> sample of an lmms-eval samples file (JSON lines; unreadable lines skipped)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        try:
            s = json.loads(line)
        except ValueError:
            continue
        if isinstance(s, dict) and "doc_id" in s:
            out[int(s["doc_id"])] = s
    return out


def loyalty(run: str | Path | dict, vanilla: str | Path | dict, metrics: list[str]) -> dict:
    """{"loyalty": fraction of shared documents with the vanilla answer, "score_loyalty": fraction with the vanilla
    score (None when the task's samples carry no comparable score), "n": shared documents} of two samples files
    (or their `read_samples` dicts)."""
    a = run if isinstance(run, dict) else read_samples(run)
    b = vanilla if isinstance(vanilla, dict) else read_samples(vanilla)
    shared = sorted(set(a) & set(b))
    if not shared:
        return {"loyalty": None, "score_loyalty": None, "n": 0}
    same = sum(_answer(a[d]) == _answer(b[d]) for d in shared)
    scores = [(sample_score(a[d], metrics), sample_score(b[d], metrics)) for d in shared]
    comparable = [(x, y) for x, y in scores if x is not None and y is not None]
    return {"loyalty": same / len(shared),
            "score_loyalty": sum(x == y for x, y in comparable) / len(comparable) if comparable else None,
            "n": len(shared)}


def add_loyalty(rows: list[dict], problems: list[str]) -> None:
    """Fill each row's loyalty against the vanilla row of its task and model (vanilla: against itself = 1.0)."""
    vanilla = {(r["task"], r["model"]): r for r in rows if r["method"].split(" ")[0] == "vanilla" and r["samples"]}
    for r in rows:
        base = vanilla.get((r["task"], r["model"]))
        if base is None or not r.get("samples"):
            continue
        try:
            got = loyalty(r["samples"], base["samples"], r["metrics"])
        except OSError as e:
            problems.append(f"{r['samples']}: unreadable samples ({e}); loyalty left empty")
            continue
        r["loyalty"], r["score_loyalty"], r["loyal_n"] = got["loyalty"], got["score_loyalty"], got["n"]


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS, float_digits=3)


def _fmt(v, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def grid_table(rows: list[dict]) -> str:
    """One markdown table per model: a row per (method, ratio), a column per task; each cell "score (loyalty)".
    Efficiency (mean prefill ms, TFLOPs, KV KiB) is the mean over the row's tasks."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        tasks = sorted({r["task"] for r in rs})
        keys = sorted({(r["method"], r["ratio"]) for r in rs}, key=lambda k: (not k[0].startswith("vanilla"), k))
        cell = {(r["method"], r["ratio"], r["task"]): r for r in rs}
        head = ["method", "ratio"] + tasks + ["prefill ms", "TFLOPs", "KV KiB"]
        lines = [f"model {model}: score (loyalty) per task", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for method, ratio in keys:
            got = [cell.get((method, ratio, t)) for t in tasks]
            cells = [("" if r is None else _fmt(r["score"]) + (f" ({_fmt(r['loyalty'], 2)})"
                                                                if r.get("loyalty") is not None else ""))
                     for r in got]
            effs = []
            for key in ("prefill_ms", "tflops", "kv_kib"):
                vals = [r[key] for r in got if r is not None and r.get(key) is not None]
                effs.append(_fmt(sum(vals) / len(vals), 4 if key == "tflops" else 1) if vals else "")
            lines.append("| " + " | ".join([method, f"{ratio:g}", *cells, *effs]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def pareto_front(points: list[dict], cost: str = "tflops", value: str = "score") -> list[dict]:
    """The points no other point beats (lower or equal `cost` and higher `value`, or lower cost and equal value),
    cheapest first; points without a cost are left out."""
    pts = sorted((p for p in points if p.get(cost) is not None and p.get(value) is not None),
                 key=lambda p: (p[cost], -p[value]))
    front, best = [], None
    for p in pts:
        if best is None or p[value] > best:
            front.append(p)
            best = p[value]
    return front


def frontier_text(rows: list[dict]) -> str:
    """Per task and model: the accuracy-vs-TFLOPs Pareto frontier as a list of (method, ratio, TFLOPs, score)."""
    lines = []
    for task, model in sorted({(r["task"], r["model"]) for r in rows}):
        front = pareto_front([r for r in rows if r["task"] == task and r["model"] == model])
        if front:
            pts = ", ".join(f"{r['method']} @ {r['ratio']:g} ({r['tflops']:.4g} TFLOPs, {r['score']:.3f})"
                            for r in front)
            lines.append(f"- {task} / {model}: {pts}")
    return ("accuracy-vs-TFLOPs Pareto frontier (cheapest first):\n" + "\n".join(lines)) if lines else ""


PLOTS_MISSING = ("plots not drawn: matplotlib is not installed (it comes with the eval extra: "
                 "pip install -e \".[eval]\")")


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """accuracy vs kept fraction, and accuracy vs prefill time, one line per method (per task/model).
    Raises ImportError with `PLOTS_MISSING` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(PLOTS_MISSING) from e
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
        safe = _safe(f"{task}_{model}")
        path = out_dir / f"report_{safe}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
        written.append(_frontier_plot(plt, rs, task, model, out_dir / f"report_frontier_{safe}.png"))
    for model in sorted({r["model"] for r in rows}):
        written.append(_heatmap(plt, [r for r in rows if r["model"] == model], model,
                                out_dir / f"report_heatmap_{_safe(model)}.png"))
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _frontier_plot(plt, rows: list[dict], task: str, model: str, path: Path) -> Path:
    """accuracy vs prefill TFLOPs and vs prefill ms: every run a point (one colour per method), the Pareto frontier
    a dashed step line through its points (circled)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = sorted({r["method"] for r in rows})
    colours = plt.get_cmap("tab10")
    for ax, cost, label in ((axes[0], "tflops", "mean prefill TFLOPs"), (axes[1], "prefill_ms", "mean prefill ms")):
        for i, m in enumerate(methods):
            pts = [r for r in rows if r["method"] == m and r.get(cost) is not None]
            ax.scatter([r[cost] for r in pts], [r["score"] for r in pts], color=colours(i % 10), label=m, zorder=3)
            for r in pts:
                ax.annotate(f"{r['ratio']:g}", (r[cost], r["score"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        front = pareto_front(rows, cost)
        if front:
            ax.step([r[cost] for r in front], [r["score"] for r in front], where="post", linestyle="--",
                    color="black", label="Pareto frontier", zorder=2)
            ax.scatter([r[cost] for r in front], [r["score"] for r in front], s=120, facecolors="none",
                       edgecolors="black", zorder=4)
        ax.set(xlabel=label, ylabel=rows[0]["metric"])
    axes[0].set_title(f"{task} / {model}: accuracy vs cost (labels: ratio removed)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _heatmap(plt, rows: list[dict], model: str, path: Path) -> Path:
    """method x ratio (rows) by task (columns): score relative to the task's vanilla score (raw score when the task
    has no vanilla run), the score printed in each cell."""
    tasks = sorted({r["task"] for r in rows})
    keys = sorted({(r["method"], r["ratio"]) for r in rows}, key=lambda k: (not k[0].startswith("vanilla"), k))
    cell = {(r["method"], r["ratio"], r["task"]): r for r in rows}
    base = {r["task"]: r["score"] for r in rows if r["method"].startswith("vanilla")}
    grid = []
    for m, ratio in keys:
        line = []
        for t in tasks:
            r = cell.get((m, ratio, t))
            if r is None:
                line.append(float("nan"))
            else:
                line.append(r["score"] / base[t] if base.get(t) else r["score"])
        grid.append(line)
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 3, 0.45 * len(keys) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(keys)), [f"{m} @ {ratio:g}" for m, ratio in keys], fontsize=8)
    for i, (m, ratio) in enumerate(keys):
        for j, t in enumerate(tasks):
            r = cell.get((m, ratio, t))
            if r is not None:
                ax.text(j, i, f"{r['score']:.2f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label="score / vanilla score")
    ax.set_title(f"{model}: method x ratio x task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class ReportExists(FileExistsError):
    """report.md is already there and `force` was not given."""


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, with_plots: bool = True,
                 force: bool = False, only: set[Path] | None = None) -> str:
    """Write report.md, report.json and (with matplotlib) one PNG per task/model into `out_dir` (default
    `results_dir`); return the text printed by `mllm-eff report`: the table, the skipped runs, the plots written
    or why none were. An existing report.md raises `ReportExists` unless `force`; `only` limits the rows to
    those result files."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"RESULTS_DIR {results_dir} is not a directory")
    out = Path(out_dir) if out_dir is not None else results_dir
    md = out / "report.md"
    existed = md.exists()
    if existed and not force:
        raise ReportExists(f"{md} exists; pass --force to replace it, or --out DIR to write elsewhere")
    got = collect_runs(results_dir, only)
    skipped = "".join(f"\n- {p}" for p in got.problems)
    if not got.rows:
        raise FileNotFoundError(f"no usable lmms-eval results (*results*.json) under {results_dir}"
                                + (f"; problems:{skipped}" if skipped else ""))
    text = table(got.rows) + "\n\n" + grid_table(got.rows)
    front = frontier_text(got.rows)
    if front:
        text += "\n\n" + front
    if skipped:
        text += f"\n\nskipped or incomplete runs ({len(got.problems)}):{skipped}"
    out.mkdir(parents=True, exist_ok=True)
    md.write_text(f"# Evaluation report ({results_dir})\n\n{text}\n")
    (out / "report.json").write_text(json.dumps(got.rows, indent=1))
    text += f"\n\nreport: {md}" + (" (replaced the existing one)" if existed else "")
    if with_plots:
        try:
            for p in plots(got.rows, out):
                text += f"\nplot: {p}"
        except ImportError as e:
            text += f"\n{e}"
    return text
