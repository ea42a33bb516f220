"""`mllm-eff eval TASK MODEL METHOD RATIO [lmms-eval args]`, `mllm-eff report RESULTS_DIR`,
`mllm-eff sweep TASKS MODEL METHODS RATIOS` and `mllm-eff tasks`.

Pass-through: the positionals come first; from the first option `eval` does not know (`--seed 1`,
`--gen_kwargs=...`) every token that is not one of eval's own options goes to lmms-eval unchanged
(`split_passthrough`). Errors print one `error: ...` line and exit 2 before lmms-eval starts.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..errors import ConfigError

_NUMBER = re.compile(r"-\d|-\.\d")  # "-0.1" is a (bad) RATIO, not an option


def add_commands(sub) -> None:
    ev = sub.add_parser(
        "eval", help="evaluate a model + method through lmms-eval (no arguments: the offline embedded default)",
        description="Run lmms-eval with the mllm_efficiency model. RATIO is the fraction of tokens removed, in "
                    "[0, 1). Results: results/<task>/<model>/<method>[-<method_args>]_<ratio>/ (e.g. "
                    "fastv-k2_0.75). Options not listed here (--seed 1, --gen_kwargs ..., after the positionals) "
                    "are passed to lmms-eval unchanged. MODEL: shapes-vlm, a Hugging Face model directory or a "
                    "hub id in the local cache, checked before lmms-eval starts. MLLM_EFF_LAUNCHER (e.g. "
                    "\"accelerate launch --num_processes 4\") replaces python as lmms-eval's launcher. With no "
                    "positional arguments, runs the embedded default (shapes_vqa on shapes-vlm, vanilla and FastV) "
                    "and prints the table of these runs.")
    ev.add_argument("task", nargs="?", help="lmms-eval task(s), e.g. shapes_vqa or textvqa_val")
    ev.add_argument("model", nargs="?", help="a model directory, or shapes-vlm (the embedded default)")
    ev.add_argument("method", nargs="?", help="vanilla, a method name, or a chain such as fastv+snapkv")
    ev.add_argument("ratio", nargs="?", help="fraction of tokens removed, in [0, 1)")
    ev.add_argument("--method_args", default="", help="extra method parameters, e.g. k=3,scorer=random")
    ev.add_argument("--results_root", default="results", help="root of the results tree (default: results)")
    passed = ev.add_argument_group("passed to lmms-eval")
    passed.add_argument("--limit", default=None, help="number (or fraction) of questions per task")
    passed.add_argument("--log_samples", action="store_true", help="write per-question outputs")
    passed.add_argument("--output_path", default=None, help="results directory (default: the results tree)")
    passed.add_argument("--batch_size", default=None, help="requests per generate() call")
    passed.add_argument("--lmms_args", default="", help="any other lmms-eval options, one quoted string")
    ev.set_defaults(run=cmd_eval, allow_extra=True)

    rep = sub.add_parser(
        "report", help="markdown table + plots across the lmms-eval runs under RESULTS_DIR",
        description="Collect every lmms-eval result under RESULTS_DIR into report.md, report.json and one PNG per "
                    "task/model (matplotlib, from the eval extra). Unreadable runs are skipped and listed. An "
                    "existing report.md is replaced only with --force.")
    rep.add_argument("results_dir")
    rep.add_argument("--out", default=None, help="where report.md / report.json / PNGs go (default: RESULTS_DIR)")
    rep.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    rep.add_argument("--force", action="store_true", help="replace an existing report.md")
    rep.set_defaults(run=cmd_report)

    sw = sub.add_parser(
        "sweep", help="run the grid TASKS x METHODS x RATIOS (+ one vanilla run per task), then report it",
        description="Run `eval` for every task x method x ratio (comma-separated lists) plus one vanilla run per task "
                    "(the loyalty baseline), then write report.md / report.json / plots of exactly these runs into "
                    "--out (default RESULTS_ROOT/sweep_<model>). Resumable: cells whose run.json and results file "
                    "exist are skipped.")
    sw.add_argument("tasks", help="comma-separated tasks, e.g. shapes_vqa,pope,gqa")
    sw.add_argument("model")
    sw.add_argument("methods", help="comma-separated methods or chains, e.g. fastv,random,fastv+snapkv")
    sw.add_argument("ratios", help="comma-separated ratios removed, e.g. 0.25,0.5,0.75")
    sw.add_argument("--method_args", default="", help="extra method parameters for every run, e.g. k=3")
    sw.add_argument("--results_root", default="results", help="root of the results tree (default: results)")
    sw.add_argument("--out", default=None, help="where the report goes (default: RESULTS_ROOT/sweep_<model>)")
    sw.add_argument("--limit", default=None, help="questions per task (passed to lmms-eval)")
    sw.add_argument("--batch_size", default=None, help="requests per generate() call (passed to lmms-eval)")
    sw.add_argument("--lmms_args", default="", help="any other lmms-eval options, one quoted string")
    sw.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sw.set_defaults(run=cmd_sweep)

    tk = sub.add_parser(
        "tasks", help="list the tasks run_eval runs on local documents, and where their documents come from",
        description="The shapes tasks and lmms-eval's own tasks with local documents (MLLM_EFF_TASK_DATA: "
                    "synthetic (default), hub, or TASK=PATH of a local copy of the real dataset). --write DIR writes "
                    "the override YAMLs (lmms-eval's task included, the dataset source replaced) into DIR.")
    tk.add_argument("--write", default=None, metavar="DIR", help="write the tasks' override YAMLs into DIR")
    tk.add_argument("--task", default=None, help="with --write: only these tasks (comma-separated)")
    tk.set_defaults(run=cmd_tasks)


def _own_options() -> tuple[set[str], set[str]]:
    """(options of `eval` that take a value, flags of `eval`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_commands(parser.add_subparsers())
    ev = parser._subparsers._group_actions[0].choices["eval"]  # noqa: SLF001
    valued, flags = set(), set()
    for action in ev._actions:  # noqa: SLF001
        (flags if action.nargs == 0 else valued).update(action.option_strings)
    return valued, flags


def split_passthrough(tokens: list[str]) -> tuple[list[str], list[str]]:
    """Split the arguments after `eval` into (eval's own, lmms-eval's). eval's own options are recognised
    anywhere; from the first other option on, every other token (option or value) is lmms-eval's; `--` sends the
    rest to lmms-eval."""
    valued, flags = _own_options()
    mine, extra = [], []
    passing = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        name = tok.split("=", 1)[0]
        if tok == "--":
            extra += tokens[i + 1:]
            break
        if name in valued:
            take = 1 if "=" in tok else 2
            mine += tokens[i:i + take]
            i += take
            continue
        if tok in flags:
            mine.append(tok)
        elif tok.startswith("-") and tok != "-" and not _NUMBER.match(tok):
            passing = True
            extra.append(tok)
        elif passing:
            extra.append(tok)
        else:
            mine.append(tok)
        i += 1
    return mine, extra


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv for argparse, lmms-eval's pass-through options) for a whole command line; only `eval` passes any."""
    argv = list(argv)
    cmd = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if cmd is None or argv[cmd] != "eval":
        return argv, []
    mine, extra = split_passthrough(argv[cmd + 1:])
    return argv[:cmd + 1] + mine, extra


def _split_extra(args) -> list[str]:
    import shlex

    extra = []
    for name in ("limit", "output_path", "batch_size"):
        value = getattr(args, name, None)
        if value is not None:
            extra += [f"--{name}", str(value)]
    if getattr(args, "log_samples", False):
        extra.append("--log_samples")
    extra += shlex.split(getattr(args, "lmms_args", "") or "")
    return extra + list(getattr(args, "extra", None) or [])


def _default_job(extra: list[str], root: str) -> int:
    """The embedded default: each run of DEFAULT_RUNS, then the table of exactly these runs (earlier results in
    the same directories are not shown), written to report.md beside them (replacing an earlier one, said so)."""
    import json
    import os

    from .report import build_report
    from .runner import DEFAULT_MODEL, DEFAULT_RUNS, DEFAULT_TASK, EvalRun, execute, launcher_from_env, validate

    runs = [EvalRun(DEFAULT_TASK, DEFAULT_MODEL, method, ratio, margs, extra, root)
            for method, ratio, margs in DEFAULT_RUNS]
    for run in runs:  # every check before the first run starts
        validate(run)
    launcher_from_env()
    mine = set()
    for run in runs:
        rc = execute(run)
        if rc:
            return rc
        mine.add(Path(json.loads((run.output_dir / "run.json").read_text())["results"]))
    where = Path(os.path.commonpath([str(r.output_dir.absolute()) for r in runs]))
    print(build_report(where, force=True, only=mine))
    return 0


def cmd_eval(args) -> int:
    from .runner import EvalRun, execute, parse_ratio

    extra = _split_extra(args)
    given = [a for a in (args.task, args.model, args.method, args.ratio) if a is not None]
    try:
        if not given:
            return _default_job(extra, args.results_root)
        if len(given) != 4:
            missing = " ".join(("TASK", "MODEL", "METHOD", "RATIO")[len(given):])
            print(f"error: expected 4 arguments TASK MODEL METHOD RATIO, got {len(given)} (missing: {missing}); "
                  "usage: mllm-eff eval TASK MODEL METHOD RATIO [lmms-eval args] "
                  "(or no arguments for the embedded default)", file=sys.stderr)
            return 2
        run = EvalRun(args.task, args.model, args.method, parse_ratio(args.ratio), args.method_args, extra,
                      args.results_root)
        return execute(run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_report(args) -> int:
    from .report import build_report

    try:
        print(build_report(args.results_dir, args.out, with_plots=not args.no_plots, force=args.force))
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_sweep(args) -> int:
    import shlex

    from .sweep import sweep

    extra = []
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None:
            extra += [f"--{name}", str(getattr(args, name))]
    extra += shlex.split(args.lmms_args or "")
    try:
        return sweep(args.tasks, args.model, args.methods, args.ratios, args.method_args, extra,
                     args.results_root, args.out, with_plots=not args.no_plots)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_tasks(args) -> int:
    from . import lmms_tasks
    from .tasks import LOCAL_TASKS

    try:
        sources = lmms_tasks.data_sources()
        if args.write:
            names = [t.strip() for t in args.task.split(",")] if args.task else list(lmms_tasks.TASKS)
            for t in names:
                print(lmms_tasks.write_override(t, args.write, lmms_tasks.source_for(t, sources)))
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| task | definition | split | documents |\n|---|---|---|---|")
    for name, (kind, n, _) in LOCAL_TASKS.items():
        print(f"| {name} | mllm_efficiency (shapes {kind}) | test | synthetic ({n}) |")
    for name, spec in lmms_tasks.TASKS.items():
        src = lmms_tasks.source_for(name, sources)
        src = f"synthetic ({spec.default_n})" if src == "synthetic" else src
        print(f"| {name} | lmms_eval/tasks/{spec.yaml} | {spec.split} | {src} |")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (used by scripts/run_eval.sh): options eval does not know go to lmms-eval."""
    parser = argparse.ArgumentParser(prog="mllm-eff")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    argv, extra = split_argv(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    args.extra = extra
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
