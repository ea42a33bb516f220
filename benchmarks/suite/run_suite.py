#!/usr/bin/env python3
"""The summary suite: every method family's main methods on the reference shapes, one `mllm-eff bench` run per
shape (random 7B-size weights, bf16, SDPA), and the summary table of benchmarks/README.md.

Shapes (issue 8):
  llava-1image   LLaVA-1.5-7B, 1 image  x 576 tokens + 64 text tokens
  llava-8images  LLaVA-1.5-7B, 8 images x 576 tokens + 64 text tokens
  ov-video32     LLaVA-OneVision-7B, 32-frame video (32 x 196 pooled tokens) + 64 text tokens
  text-32k       Llama-3-8B, 32,768 text tokens (GQA: 4 GiB of KV, ~25 GB peak)
Each entry is checked against the registry first; an entry whose method is not registered in this install is
left out with a note, and a failing entry is recorded in the table instead of stopping the suite.

GPU (one H100, ~6-8 min):
  PYTHONPATH=src python3 benchmarks/suite/run_suite.py --out benchmarks/suite/results --readme benchmarks/README.md
CPU smoke (tiny models, ~1 min):
  python benchmarks/suite/run_suite.py --tiny --out /tmp/suite
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
try:
    import mllm_efficiency  # noqa: F401
except ImportError:  # run from a checkout without installation
    sys.path.insert(0, str(REPO / "src"))

import torch

from mllm_efficiency.bench.harness import BenchSettings, run_bench
from mllm_efficiency.bench.prompts import PromptShape
from mllm_efficiency.bench.report import summary_rows, write_bench
from mllm_efficiency.bench.specs import parse_entry
from mllm_efficiency.bench.timing import markdown_table
from mllm_efficiency.errors import ConfigError

PRUNING = ["fastv:k=2,ratio=0.5", "fastv:k=2,ratio=0.75", "simignore:ratio=0.5"]
KV_VISUAL = ["snapkv:ratio=0.5", "pyramidkv:ratio=0.5", "streamingllm:ratio=0.5", "vlcache:ratio=0.5",
             "fastv:k=2,ratio=0.5+snapkv:ratio=0.5"]
VIDEO = ["framefusion", "focus"]
KV_TEXT = ["snapkv:ratio=0.5", "snapkv:ratio=0.9", "pyramidkv:ratio=0.9", "adakv:ratio=0.9",
           "streamingllm:ratio=0.9", "l2norm:ratio=0.9"]
MEMORY = ["infllm"]

# name: (model, tiny model, shape, tiny shape, entries, prefill (warmup, repeats), decode steps)
SHAPES = {
    "llava-1image": ("llava-1.5-7b", "tiny-llava", PromptShape(images=1, context=64),
                     PromptShape(images=1, context=16), ["vanilla"] + PRUNING + KV_VISUAL, (3, 10), 32),
    "llava-8images": ("llava-1.5-7b", "tiny-llava", PromptShape(images=8, context=64),
                      PromptShape(images=8, context=16), ["vanilla"] + PRUNING + KV_VISUAL, (2, 6), 32),
    "ov-video32": ("llava-onevision-7b", "tiny-llava-onevision", PromptShape(frames=32, context=64),
                   PromptShape(frames=8, context=16), ["vanilla"] + PRUNING[:2] + VIDEO + KV_VISUAL[:3], (2, 5), 32),
    "text-32k": ("llama-3-8b", "tiny-llama", PromptShape(context=32768), PromptShape(context=512),
                 ["vanilla"] + KV_TEXT + MEMORY, (1, 2), 24),
}
README_BEGIN, README_END = "<!-- suite:begin -->", "<!-- suite:end -->"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for one bench.{json,md,png} per shape and summary.md")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--tiny", action="store_true", help="tiny models and shapes on CPU (smoke test of the suite)")
    p.add_argument("--decode", default="both", choices=["hf", "fast", "both", "none"])
    p.add_argument("--readme", default=None, help="rewrite the summary block of this README (between the "
                                                  f"{README_BEGIN} / {README_END} markers)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def usable_entries(entries: list[str]) -> tuple[list[str], list[str]]:
    ok, skipped = [], []
    for e in entries:
        try:
            parse_entry(e)
            ok.append(e)
        except ConfigError as err:
            skipped.append(f"{e} ({err})")
    return ok, skipped


def run_shape(name: str, args) -> tuple[dict, list[str]]:
    model, tiny_model, shape, tiny_shape, entries, (warmup, repeats), steps = SHAPES[name]
    entries, skipped = usable_entries(entries)
    if args.tiny:
        model, shape, warmup, repeats, steps = tiny_model, tiny_shape, 0, 1, 2
    settings = BenchSettings(model=model, entries=tuple(entries), shape=shape, decode=args.decode,
                             new_tokens=steps, decode_warmup=1 if args.tiny else 4, warmup=warmup, repeats=repeats,
                             device=args.device)
    result = run_bench(settings, progress=not args.quiet)
    result["suite_shape"] = name
    result["skipped_entries"] = skipped
    write_bench(result, Path(args.out) / name)
    return result, skipped


SUMMARY_COLUMNS = [("shape", "shape"), ("entry", "method"), ("tokens", "prompt tokens"), ("ttft_ms", "TTFT ms"),
                   ("ttft_speedup", "TTFT speedup"), ("flops_ratio", "FLOPs ratio"), ("kv_mib", "KV MiB"),
                   ("hf_step_ms", "HF step ms"), ("fast_step_ms", "fast step ms"), ("roofline_ms", "roofline ms"),
                   ("fast_over_roofline", "fast / roofline"), ("peak_gib", "peak GiB"), ("error", "error")]


def summary_markdown(results: list[dict], wall_s: float) -> str:
    rows = []
    for res in results:
        for r in summary_rows(res):
            r = dict(r, shape=res["suite_shape"], tokens=res["prompt"]["length"])
            r["roofline_ms"] = r.get("fast_roofline_ms", r.get("hf_roofline_ms"))
            r["peak_gib"] = max([v for v in (r.get("prefill_peak_gib"), r.get("hf_peak_gib"), r.get("fast_peak_gib"))
                                 if v is not None], default=None)
            if r.get("error"):
                r["error"] = r["error"][:120]
            rows.append(r)
    cols = [c for c in SUMMARY_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    env = results[0]["environment"] if results else {}
    device = env.get("gpu") or "CPU"
    lines = [f"Measured on {device}, torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"{env.get('time_utc')}; suite wall time {wall_s / 60:.1f} min. Random weights, "
             f"{results[0]['settings']['dtype'] if results else ''}, SDPA. Medians; speedups and FLOPs ratios are "
             "vanilla / method; roofline = (decoder weights + KV bytes) / measured bandwidth.", ""]
    lines.append(markdown_table(rows, cols, float_digits=2))
    for res in results:
        if res.get("skipped_entries"):
            lines.append(f"\n{res['suite_shape']}: not registered in this install, skipped: "
                         + "; ".join(res["skipped_entries"]))
    return "\n".join(lines) + "\n"


def update_readme(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    new = f"{README_BEGIN}\n{block}{README_END}"
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + new + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.device = args.device or "cpu"
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = []
    for name in args.shapes:
        print(f"=== {name}", file=sys.stderr, flush=True)
        result, _ = run_shape(name, args)
        results.append(result)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t0
    md = summary_markdown(results, wall)
    out = Path(args.out)
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({"wall_s": wall, "shapes": [r["suite_shape"] for r in results]}))
    print(md)
    if args.readme:
        update_readme(Path(args.readme), md)
        print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
