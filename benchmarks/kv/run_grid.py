#!/usr/bin/env python
"""Accuracy grid for KV-cache methods on generated long-context tasks, with a real small model, offline.

    python benchmarks/kv/run_grid.py --model smollm2-135m --methods none --tasks passkey niah \
        --lengths 1024 --n 2

Cells: method x ratio x task x length (``ratio`` = fraction of the prompt KV removed; ``none`` = full cache, run
once per task and length). Every cell of a (task, length) pair runs on the **same** samples, so methods are
compared pairwise. Writes a JSON of all records (rewritten after every cell, so an interrupted run keeps what it
finished), a markdown table and a plot (accuracy vs ratio per method; needs matplotlib, skipped otherwise).
See benchmarks/kv/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1) (fraction of the KV removed), got {text}")
    return value


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"depth must be a number in [0, 1], got {text!r}") from None
    if not (0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"depth must be a fraction in [0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="model alias (smollm2-135m, qwen2.5-coder-0.5b) or a .gguf / Hugging Face directory path")
    p.add_argument("--methods", nargs="+", default=["none"],
                   help="'none' (full cache) and/or registered KV methods, e.g. none snapkv streamingllm")
    p.add_argument("--ratios", nargs="+", type=_ratio, default=[0.5, 0.75, 0.9],
                   help="fractions of the prompt KV removed (methods other than none)")
    p.add_argument("--tasks", nargs="+", default=["passkey", "kv_retrieval"],
                   help="passkey number_string kv_retrieval niah")
    p.add_argument("--lengths", nargs="+", type=_positive_int, default=[1024], help="prompt lengths in tokens")
    p.add_argument("--depths", nargs="+", type=_depth, default=None,
                   help="answer depths in [0, 1]; --n samples per depth (default: --n depths spread over [0, 1])")
    p.add_argument("--n", type=_positive_int, default=3, help="samples per cell (per depth with --depths)")
    p.add_argument("--placement", default="last", help="question placement: last, first_last (first+last), first")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default per task: passkey/number_string 32, kv_retrieval 100, niah 50")
    p.add_argument("--no-early-stop", action="store_true",
                   help="always generate max-new-tokens (early stop only ends generations whose score is decided)")
    p.add_argument("--method-kwargs", default="{}",
                   help='JSON: extra config per method, e.g. \'{"snapkv": {"window": 32}}\'')
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-convert", action="store_true",
                   help="load from the GGUF every time instead of the cached safetensors conversion")
    p.add_argument("--out-json", type=Path, default=HERE / "results_grid.json")
    p.add_argument("--out-md", type=Path, default=HERE / "results_grid.md")
    p.add_argument("--out-plot", type=Path, default=HERE / "results_grid.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-sample lines")
    return p


def _is_none(method: str) -> bool:
    return method.strip().lower() in ("none", "full", "origin", "baseline")


def cells_of(methods, ratios):
    """(method, ratio) pairs; the full cache once, at ratio 0."""
    out = []
    for m in methods:
        if _is_none(m):
            out.append(("none", 0.0))
        else:
            out.extend((m.lower(), float(r)) for r in ratios)
    return out


def summarize(records: list[dict]) -> dict:
    """{(method, ratio, task, length): {"acc", "n", "time_s"}} over the records."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["method"] or "none", float(r.get("ratio", 0.0)), r["task"], int(r["target_length"]))
        groups.setdefault(key, []).append(r)
    return {k: {"acc": sum(x["score"] for x in v) / len(v), "n": len(v),
                "time_s": sum(x["time_s"] for x in v) / len(v)} for k, v in groups.items()}


def markdown_table(records: list[dict], meta: dict) -> str:
    summ = summarize(records)
    rows = sorted({(k[0], k[1]) for k in summ}, key=lambda mr: (mr[0] != "none", mr[0], mr[1]))
    cols = sorted({(k[2], k[3]) for k in summ}, key=lambda tl: (tl[0], tl[1]))
    lines = [f"# KV grid: {meta['model']}", ""]
    lines.append(f"Command: `{meta['command']}`  ")
    lines.append(f"{meta['date']} · {meta['device']} · torch {meta['torch']} · "
                 f"transformers {meta['transformers']} · "
                 f"dtype {meta['dtype']} · placement {meta['placement']} · n per cell {meta['n_per_cell']} · "
                 f"depths {meta['depths']} · wall {meta.get('wall_s', 0):.0f} s")
    lines.append("")
    lines.append("Accuracy in % (mean score; niah = fraction of the needle's words). `ratio` = fraction of the prompt "
                 "KV removed (keep = 1 - ratio); `none` = full cache.")
    lines.append("")
    head = ["method", "ratio", "keep"] + [f"{t} @ {l}" for t, l in cols] + ["mean", "s/sample"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) + 2)) + "|")
    for m, r in rows:
        cells, accs, times, ns = [], [], [], 0
        for t, l in cols:
            c = summ.get((m, r, t, l))
            if c is None:
                cells.append("–")
            else:
                cells.append(f"{100 * c['acc']:.0f}")
                accs.append(c["acc"])
                times.append(c["time_s"] * c["n"])
                ns += c["n"]
        mean = f"{100 * sum(accs) / len(accs):.0f}" if accs else "–"
        spt = f"{sum(times) / ns:.1f}" if ns else "–"
        lines.append("| " + " | ".join([m, f"{r:.2f}", f"{1 - r:.2f}"] + cells + [mean, spt]) + " |")
    lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    summ = summarize(records)
    tasks = sorted({k[2] for k in summ})
    lengths = sorted({k[3] for k in summ})
    methods = sorted({k[0] for k in summ if k[0] != "none"})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, task in zip(axes[0], tasks):
        for li, length in enumerate(lengths):
            full = summ.get(("none", 0.0, task, length))
            if full is not None:
                ax.axhline(100 * full["acc"], color="k", ls=styles[li % 4], lw=1,
                           label=f"full cache @ {length}")
            for mi, m in enumerate(methods):
                pts = sorted((k[1], v["acc"]) for k, v in summ.items() if k[0] == m and k[2] == task and k[3] == length)
                if pts and full is not None and pts[0][0] > 0:
                    pts.insert(0, (0.0, full["acc"]))  # ratio 0 is the full cache by definition
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", ls=styles[li % 4],
                            color=f"C{mi}", label=f"{m} @ {length}")
        ax.set_title(task)
        ax.set_xlabel("ratio (fraction of KV removed)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.time()
    try:
        method_kwargs = json.loads(args.method_kwargs)
        assert isinstance(method_kwargs, dict)
    except (ValueError, AssertionError):
        print(f"--method-kwargs must be a JSON object, got {args.method_kwargs!r}", file=sys.stderr)
        return 2

    import torch

    import mllm_efficiency as me
    from mllm_efficiency.errors import ConfigError
    from mllm_efficiency.eval import longctx
    from mllm_efficiency.zoo import ModelNotInstalledError, load_model

    # check everything cheap before loading the model
    try:
        tasks = [longctx._normalize_task(t) for t in args.tasks]
        placement = longctx._normalize_placement(args.placement)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = [m for m in args.methods if not _is_none(m) and m.lower() not in me.available_methods()]
    if unknown:
        print(f"error: method(s) {unknown} are not registered (yet). mllm_efficiency.available_methods() = "
              f"{me.available_methods()}; 'none' runs the full cache.", file=sys.stderr)
        return 2
    cells = cells_of(args.methods, args.ratios)

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t0 = time.time()
    try:
        model, tok = load_model(args.model, dtype=args.dtype, device=args.device,
                                attn_implementation=args.attn_implementation, convert=not args.no_convert)
    except (ModelNotInstalledError, ConfigError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_s = time.time() - t0
    print(f"loaded {args.model} in {load_s:.1f} s ({type(model).__name__}, {model.dtype}, "
          f"{torch.get_num_threads()} threads)", flush=True)

    import transformers

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    cpu = platform.processor() or platform.machine()
    meta = {
        "model": args.model, "command": command, "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": f"{args.device} ({cpu}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(model.dtype).replace("torch.", ""), "placement": placement, "chat": args.chat,
        "n_per_cell": args.n if args.depths is None else f"{args.n} x {len(args.depths)} depths",
        "depths": args.depths if args.depths is not None else "spread", "seed": args.seed,
        "methods": args.methods, "ratios": args.ratios, "tasks": tasks, "lengths": args.lengths,
        "max_new_tokens": args.max_new_tokens, "early_stop": not args.no_early_stop, "load_s": round(load_s, 2),
        "method_kwargs": method_kwargs,
    }
    records: list[dict] = []
    args.out_json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        meta["wall_s"] = round(time.time() - t_start, 1)
        tmp = args.out_json.with_name(args.out_json.name + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "summary": [
            {"method": k[0], "ratio": k[1], "task": k[2], "length": k[3], **v}
            for k, v in sorted(summarize(records).items())], "records": records}, indent=1))
        os.replace(tmp, args.out_json)

    for task in tasks:
        for length in args.lengths:
            try:
                samples = longctx.make_samples(task, tok, length, args.n, depths=args.depths, seed=args.seed,
                                               placement=placement, chat=args.chat)
            except ConfigError as exc:
                print(f"skip {task} @ {length}: {exc}", file=sys.stderr)
                continue
            for method, ratio in cells:
                kw = dict(method_kwargs.get(method, {}))
                if method != "none":
                    kw["ratio"] = ratio

                def progress(rec, _m=method, _r=ratio):
                    if not args.quiet:
                        print(f"  {rec['task']:<13} L={rec['length_tokens']:<6} depth={rec['depth']:.2f} "
                              f"{_m}@{_r:.2f}: {'OK ' if rec['correct'] else 'BAD'} score={rec['score']:.2f} "
                              f"pred={rec['prediction'][:40]!r} answer={rec['answer']!r} {rec['time_s']:.1f}s",
                              flush=True)

                try:
                    recs = longctx.run_samples(model, tok, samples, method=None if method == "none" else method,
                                               method_kwargs=kw, max_new_tokens=args.max_new_tokens,
                                               early_stop=not args.no_early_stop, progress=progress)
                except (ConfigError, NotImplementedError, ValueError, TypeError) as exc:
                    print(f"cell {method}@{ratio} {task}@{length} failed: {type(exc).__name__}: {exc}",
                          file=sys.stderr)
                    continue
                for r in recs:
                    r["ratio"] = ratio
                    r["method"] = method
                records.extend(recs)
                acc = sum(r["score"] for r in recs) / len(recs)
                print(f"{method}@{ratio:.2f} {task}@{length}: accuracy {100 * acc:.0f}% (n={len(recs)})", flush=True)
                save()

    save()
    md = markdown_table(records, meta)
    args.out_md.parent.mkdir(parents=True, exist_ok=True)
    args.out_md.write_text(md)
    print()
    print(md)
    print(f"records: {args.out_json}\ntable: {args.out_md}")
    if not args.no_plot:
        print(plot(records, args.out_plot, f"{args.model} · placement {placement}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
