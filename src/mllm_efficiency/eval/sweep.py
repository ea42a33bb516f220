"""`mllm-eff sweep TASKS MODEL METHODS RATIOS`: the grid of `run_eval` runs (every task x method x ratio, plus one
vanilla run per task: the loyalty baseline), then one report over exactly these runs.

Resumable: a cell whose output folder already holds run_eval's run.json and the results file it names is skipped,
so an interrupted sweep started again runs only what is missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from .methods import split_names
from .runner import EvalRun, execute, parse_ratio, task_names, validate


def _split(text: str, what: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{what} must be a comma-separated list, got {text!r}")
    return items


def grid(tasks: str, model: str, methods: str, ratios: str, method_args: str = "", extra=(),
         results_root: str = "results") -> list[EvalRun]:
    """The runs of a sweep, vanilla first for each task; every run validated before any starts."""
    ratio_list = [parse_ratio(r) for r in _split(ratios, "RATIOS")]
    method_list = _split(methods, "METHODS")
    runs = []
    for task in task_names(tasks):
        runs.append(EvalRun(task, model, "vanilla", 0.0, "", list(extra), results_root))
        for method in method_list:
            if not split_names(method):
                continue  # vanilla: already there
            runs += [EvalRun(task, model, method, r, method_args, list(extra), results_root) for r in ratio_list]
    for run in runs:
        validate(run)
    return runs


def finished(run: EvalRun) -> Path | None:
    """The results file of a finished cell (run.json written by run_eval, naming a results file that exists)."""
    meta = run.output_dir / "run.json"
    try:
        results = Path(json.loads(meta.read_text())["results"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return results if results.is_file() else None


def sweep(tasks: str, model: str, methods: str, ratios: str, method_args: str = "", extra=(),
          results_root: str = "results", out: str | Path | None = None, with_plots: bool = True,
          run=execute, log=print) -> int:
    """Run the missing cells of the grid, then write the report (report.md, report.json, plots) of the grid's
    runs into `out` (default: RESULTS_ROOT/sweep_<model>). Returns 0, or the first failing run's exit code."""
    from .report import build_report

    runs = grid(tasks, model, methods, ratios, method_args, extra, results_root)
    done = []
    for i, r in enumerate(runs, 1):
        prev = finished(r)
        if prev is not None:
            log(f"[sweep] {i}/{len(runs)} {r.task} {r.label}: done earlier ({prev}), skipped")
            done.append(prev)
            continue
        log(f"[sweep] {i}/{len(runs)} {r.task} {r.label}")
        rc = run(r)
        if rc:
            log(f"[sweep] {r.task} {r.label} failed (exit {rc}); finished cells are kept, run the sweep again "
                "to resume")
            return rc
        got = finished(r)
        if got is None:
            log(f"[sweep] {r.task} {r.label}: no run.json after the run")
            return 1
        done.append(got)
    out = Path(out) if out is not None else Path(results_root) / f"sweep_{runs[0].model_name}"
    where = Path(os.path.commonpath([str(p.parent.absolute()) for p in done]))
    log(build_report(where, out, with_plots=with_plots, force=True, only=set(done)))
    return 0
