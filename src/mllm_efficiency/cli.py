"""`mllm-eff`: the command-line front end.

    mllm-eff methods                      # registered methods, their family and config fields
    mllm-eff demo                         # FastV on an embedded tiny LLaVA, offline, < 30 s on 2 CPU cores
    mllm-eff flops --preset llava-1.5-7b --k 2 --ratio 0.5 0.75 0.9
    mllm-eff predict --image scene.png --question "What color is the circle?" [--method fastv --ratio 0.75]

`main(argv)` returns the exit code (0 ok, 1 a check failed or a module is missing, 2 bad arguments). Every
verb reports a bad argument, value or file as one `error: ...` line on stderr (argparse adds its usage line for
malformed options) and exits 2; `eval` passes options it does not know to lmms-eval.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Sequence

# Published shapes of the LLaVA-1.5 language models (Vicuna / Llama-2 architecture, MHA) and the FastV paper's
# prompt: 36 prefix tokens + 576 image tokens (docs/token_pruning.md, "FLOPs accounting").
FLOPS_PRESETS: dict[str, dict] = {
    "llava-1.5-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llava-1.5-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                          num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
}


# ------------------------------------------------------------------------------------------- argument types
def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(
            f"ratio must be in [0, 1) (fraction of visual tokens removed), got {text}")
    return value


def _int_at_least(name: str, low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {value}")
        return value

    parse.__name__ = name
    return parse


# ------------------------------------------------------------------------------------------- method listing
def _methods_epilog() -> str:
    from .registry import method_specs

    lines = ["available methods:"]
    for spec in method_specs():
        lines.append(f"  {spec.name:<12} [{spec.family}] {spec.summary}")
    lines.append("")
    lines.append("Python API: mllm_efficiency.apply(model, NAME, **config) -> handle (.stats, .remove()).")
    lines.append("`ratio` is always the fraction removed, in [0, 1).")
    return "\n".join(lines)


def _field_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return "<required>"


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import available_methods, method_specs

    specs = method_specs()
    assert [s.name for s in specs] == available_methods()
    rows = [(s.name, s.family, s.summary) for s in specs]
    w_name = max([len("NAME")] + [len(r[0]) for r in rows])
    w_fam = max([len("FAMILY")] + [len(r[1]) for r in rows])
    print(f"{'NAME':<{w_name}}  {'FAMILY':<{w_fam}}  SUMMARY")
    for spec in specs:
        print(f"{spec.name:<{w_name}}  {spec.family:<{w_fam}}  {spec.summary}")
        fields = dataclasses.fields(spec.config_cls)
        print(f"{'':<{w_name}}  {'':<{w_fam}}  config {spec.config_cls.__name__}:")
        for f in fields:
            print(f"{'':<{w_name}}  {'':<{w_fam}}    {f.name} = {_field_default(f)!r}")
    return 0


# ------------------------------------------------------------------------------------------- demo
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.k >= args.layers:
        parser.error(f"argument --k: k must be in [0, {args.layers - 1}] for a {args.layers}-layer model, "
                     f"got {args.k}")
    if args.image_size % 8:
        parser.error(f"argument --image-size: image_size must be a multiple of 8 (patch size), got {args.image_size}")
    from .demo import DemoOptions, run_demo

    opts = DemoOptions(k=args.k, ratios=tuple(args.ratios), images=args.images, seed=args.seed,
                       num_layers=args.layers, image_size=args.image_size, new_tokens=args.new_tokens,
                       threads=args.threads, device=args.device or ("cuda" if _cuda() else "cpu"))
    result = run_demo(opts)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
        print(f"results written to {args.json}")
    if not result["checks_passed"]:
        failed = [c["check"] for c in result["checks"] if not c["ok"]]
        print(f"demo: internal check(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> int:
    from .eval.predict import check_args, format_result, predict

    # every check that needs no model runs before the model is loaded (ConfigError -> `error: ...`, exit 2)
    check_args(args.image, args.question, args.model, args.method, args.ratio, args.max_new_tokens)
    if args.json:
        _check_writable(args.json)
    result = predict(args.image, args.question, args.model, args.method, args.ratio,
                     max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype)
    print(format_result(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
        print(f"result written to {args.json}")
    return 0


def _check_writable(path: str) -> None:
    import os

    from .errors import ConfigError

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"--json: {path!r} is a directory")
    if not os.path.isdir(parent):
        raise ConfigError(f"--json: the directory of {path!r} does not exist")


# ------------------------------------------------------------------------------------------- flops
def cmd_flops(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        from . import flops as F
    except ImportError as e:
        print(f"mllm-eff flops: the FLOPs module is not available in this install ({e})", file=sys.stderr)
        return 1
    from .errors import ConfigError

    preset = FLOPS_PRESETS[args.preset]
    T = preset["num_hidden_layers"]
    for k in args.k:
        if k >= T:
            parser.error(f"argument --k: k must be in [0, {T - 1}] for {args.preset} ({T} layers), got {k}")
    shape = F.LayerShape.from_config(dict(preset))
    N = args.num_visual
    try:
        reports = [F.fastv_flops(shape, args.prefix_len, N, args.text_len, k, ratio)
                   for k in args.k for ratio in args.ratio]
    except ConfigError as e:
        parser.error(str(e))
    print(f"FastV FLOPs, {args.preset}: d={preset['hidden_size']}, m={preset['intermediate_size']}, T={T}, "
          f"heads={preset['num_attention_heads']}; prompt = {args.prefix_len} prefix + {N} visual + "
          f"{args.text_len} text tokens")
    header = (f"{'K':>3} {'R':>6} {'keep':>9} {'Eq5 GFLOPs':>11} {'Eq5 ratio':>10} {'exact TFLOPs':>13} "
              f"{'exact ratio':>12} {'equiv. tokens':>14}")
    print(header)
    print("-" * len(header))
    first = reports[0]
    base_eq5 = getattr(first, "paper_eq5_baseline", None)
    base_exact = getattr(first, "exact_prefill_flops_baseline", None)
    print(f"{'-':>3} {'0':>6} {f'{N}/{N}':>9} {_num(base_eq5, 1e9, 2):>11} {'1.000':>10} "
          f"{_num(base_exact, 1e12, 3):>13} {'1.000':>12} {float(N):>14.1f}   (vanilla)")
    for rep in reports:
        print(f"{rep.k:>3} {rep.ratio:>6.3g} {f'{rep.keep}/{N}':>9} "
              f"{_num(getattr(rep, 'paper_eq5_pruned', None), 1e9, 2):>11} {rep.paper_eq5_ratio:>10.3f} "
              f"{_num(getattr(rep, 'exact_prefill_flops_pruned', None), 1e12, 3):>13} "
              f"{rep.exact_ratio:>12.3f} {rep.equivalent_tokens:>14.1f}")
    print()
    print("Eq5: FastV paper Eq. 5, per-layer average over T layers, n = prefix + visual (text after the image "
          "ignored), MAC-style; the paper's 'Flops(B)' column.")
    print("exact: 2 x MACs of the whole prefill (all text, GQA widths, SwiGLU, causal n^2/2, LM head on the "
          "last position). Ratios are FastV / vanilla.")
    print("equiv. tokens: visual tokens averaged over layers, (K*N + (T-K)*keep) / T.")
    return 0


def _num(value, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


# ------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mllm-eff",
        description="Training-free efficiency methods for multimodal and long-context LLMs on stock "
                    "transformers 5.x (no fork).",
        epilog=_methods_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mllm-efficiency {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    methods = sub.add_parser("methods", help="list the registered methods with their config fields and defaults",
                             description="List the registered methods with their config fields and defaults.")
    methods.set_defaults(run=lambda args: cmd_methods(args))

    demo = sub.add_parser(
        "demo", help="run FastV on an embedded tiny random-weight LLaVA (offline, CPU, seconds)",
        description="Build a tiny random-weight LLaVA (Llama text model + CLIP tower), a prompt with several "
                    "images and text, and run vanilla vs FastV: ratio 0 must give bit-identical logits; for "
                    "each ratio the kept tokens, per-layer cache lengths, inplace-vs-mask logit difference, "
                    "generated tokens, rough CPU prefill time and theoretical FLOPs are printed. Exit code 1 "
                    "if an internal check fails.")
    demo.add_argument("--k", type=_int_at_least("k", 0), default=2,
                      help="first layer that runs on the pruned sequence (scores from layer k-1; "
                           "k=0 uses scorer='random'); default 2")
    demo.add_argument("--ratios", "--ratio", dest="ratios", type=_ratio, nargs="+", default=[0.5, 0.75],
                      metavar="RATIO", help="fractions of visual tokens removed, each in [0, 1); default 0.5 0.75")
    demo.add_argument("--images", type=_int_at_least("images", 1), default=2,
                      help="images in the prompt; default 2")
    demo.add_argument("--seed", type=int, default=0, help="seed of the weights and pixel values; default 0")
    demo.add_argument("--layers", type=_int_at_least("layers", 1), default=4,
                      help="decoder layers of the tiny model; default 4")
    demo.add_argument("--image-size", type=_int_at_least("image_size", 8), default=64,
                      help="image side in pixels (patch 8: (size/8)^2 tokens per image); default 64 "
                           "(64 tokens per image; 192 gives LLaVA-1.5's 576)")
    demo.add_argument("--new-tokens", type=_int_at_least("new_tokens", 1), default=8,
                      help="greedy tokens generated per run; default 8")
    demo.add_argument("--threads", type=_int_at_least("threads", 0), default=1,
                      help="torch CPU threads during the demo (0: leave torch's setting); default 1")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default cuda when available (generation then runs on the fast path), else cpu")
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    demo.set_defaults(run=lambda args: cmd_demo(args, demo))

    pr = sub.add_parser(
        "predict", help="answer one question about one image (default: the embedded shapes-vlm, CPU, seconds)",
        description="Answer one question about one image with a model and a method, greedily through "
                    "mllm_efficiency.generate (the fast path where it applies; eager on CPU), with the prompt the "
                    "lmms-eval plugin builds (the processor's chat template, one image). Prints the answer, the "
                    "kept visual tokens / visual tokens (where the method records them), the prefill time (to the "
                    "first token), the KV-cache bytes at the end of the generation and the path that ran. "
                    "Arguments are checked before the model is loaded.")
    pr.add_argument("--image", required=True, metavar="PATH", help="the image file (any format PIL reads)")
    pr.add_argument("--question", required=True, metavar="TEXT", help="the question")
    pr.add_argument("--model", default="shapes-vlm", metavar="DIR|ALIAS",
                    help="shapes-vlm (the embedded default), a Hugging Face model directory, or a hub id already "
                         "in the local cache; default shapes-vlm")
    pr.add_argument("--method", default="vanilla", metavar="NAME",
                    help="a method of `mllm-eff methods`, several joined by '+' (e.g. fastv+snapkv), or vanilla; "
                         "default vanilla")
    pr.add_argument("--ratio", type=_ratio, default=None, metavar="R",
                    help="fraction of tokens the method removes, in [0, 1); default: the method's own")
    pr.add_argument("--max-new-tokens", type=_int_at_least("max_new_tokens", 1), default=16,
                    help="greedy tokens generated at most; default 16")
    pr.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default cuda when available, else cpu")
    pr.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="weights dtype; default auto (the checkpoint's)")
    pr.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    pr.set_defaults(run=cmd_predict)

    fl = sub.add_parser(
        "flops", help="theoretical FastV FLOPs table (paper Eq. 5, exact prefill count, equivalent tokens)",
        description="Theoretical FLOPs of FastV for a LLaVA-1.5 language model (docs/token_pruning.md).")
    fl.add_argument("--preset", choices=sorted(FLOPS_PRESETS), default="llava-1.5-7b",
                    help="model shape (d, m, T, heads); default llava-1.5-7b")
    fl.add_argument("--k", type=_int_at_least("k", 0), nargs="+", default=[2],
                    help="first pruned layer(s); default 2")
    fl.add_argument("--ratio", "--ratios", dest="ratio", type=_ratio, nargs="+", default=[0.5, 0.75, 0.9],
                    metavar="RATIO", help="fraction(s) of visual tokens removed, each in [0, 1); "
                                          "default 0.5 0.75 0.9")
    fl.add_argument("--prefix-len", type=_int_at_least("prefix_len", 0), default=36,
                    help="text tokens before the image; default 36 (the paper's)")
    fl.add_argument("--num-visual", type=_int_at_least("num_visual", 0), default=576,
                    help="visual tokens N; default 576")
    fl.add_argument("--text-len", type=_int_at_least("text_len", 0), default=0,
                    help="text tokens after the image (ignored by Eq. 5, counted by the exact count); default 0")
    fl.set_defaults(run=lambda args: cmd_flops(args, fl))
    _add_family_commands(sub)
    return parser


# Modules that add their own sub-commands: each defines `add_commands(subparsers)`, and every sub-command it adds
# sets `run=callable(args) -> exit code`.
_COMMAND_MODULES = ("bench.cli", "memory.cli", "video.cli", "eval.cli")


def _add_family_commands(sub) -> None:
    import importlib

    for name in _COMMAND_MODULES:  # a missing module is an error (ModuleNotFoundError names it)
        importlib.import_module(f"{__package__}.{name}").add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import ConfigError

    parser = build_parser()
    from .eval.cli import split_argv

    # `eval` passes the options it does not know to lmms-eval; other verbs reject them
    argv, extra = split_argv(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    args.extra = extra
    try:
        return args.run(args)
    except SystemExit as e:  # parser.error() inside a command
        return int(e.code) if isinstance(e.code, int) else 2
    except ConfigError as e:  # a bad value or file found by a command: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
