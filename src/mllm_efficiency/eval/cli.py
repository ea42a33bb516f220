"""`mllm-eff eval TASK MODEL METHOD RATIO [lmms-eval args]` and `mllm-eff report RESULTS_DIR`."""
from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def add_commands(sub) -> None:
    ev = sub.add_parser(
        "eval", help="evaluate a model + method through lmms-eval (no arguments: the offline embedded default)",
        description="Run lmms-eval with the mllm_efficiency model. RATIO is the fraction of tokens removed, in "
                    "[0, 1). Results: results/<task>/<model>/<method>_<ratio>/. Unknown options (--limit N, "
                    "--log_samples, --output_path P, ...) are passed to lmms-eval. With no positional arguments, "
                    "runs the embedded default (shapes_vqa on shapes-vlm, vanilla and FastV) and prints the table.")
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


def cmd_eval(args) -> int:
    from .runner import DEFAULT_MODEL, DEFAULT_RUNS, DEFAULT_TASK, EvalRun, execute, parse_ratio
    from .report import build_report

    extra = _split_extra(args)
    given = [a for a in (args.task, args.model, args.method, args.ratio) if a is not None]
    try:
        if not given:
            root = args.results_root
            for method, ratio, margs in DEFAULT_RUNS:
                rc = execute(EvalRun(DEFAULT_TASK, DEFAULT_MODEL, method, ratio, margs, extra, root))
                if rc:
                    return rc
            print(build_report(f"{root}/{DEFAULT_TASK}/{DEFAULT_MODEL}"))
            return 0
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


def main(argv=None) -> int:
    """Stand-alone entry (used by scripts/run_eval.sh): unknown options go to lmms-eval."""
    parser = argparse.ArgumentParser(prog="mllm-eff")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
