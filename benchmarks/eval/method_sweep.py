#!/usr/bin/env python
"""Accuracy of the embedded shapes VLM under every visual-token method at several R, with the prefill FLOPs each
one actually spends, on held-out `shapes_vqa` questions.

    PYTHONPATH=src python benchmarks/eval/method_sweep.py --n 1000 --device cuda --out benchmarks/eval/methods
    PYTHONPATH=src python benchmarks/eval/method_sweep.py --tiny --out /tmp/method_sweep   # seconds, pipeline

Every method is attached with `mllm_efficiency.apply(model, METHOD, ratio=R)` and its paper defaults otherwise;
`random_prune` (random visual tokens removed before layer 0) is the control. FLOPs per answer are counted, not
estimated: a forward pre-hook on every decoder layer records how many tokens each layer processes in the prefill
of the first batch, and `flops.exact_layer_flops` sums them (plus the LM head on the last row). Writes
results.json, results.md (accuracy table, FLOPs table, and which methods beat random at each R) and
accuracy_vs_ratio.png (matplotlib) into --out. No lmms-eval needed: the same questions and exact-match scoring
as the lmms-eval task shapes_vqa, called directly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import mllm_efficiency as me  # noqa: E402
from mllm_efficiency.adapters import get_adapter  # noqa: E402
from mllm_efficiency.bench.specs import parse_entry  # noqa: E402
from mllm_efficiency.bench.timing import markdown_table  # noqa: E402
from mllm_efficiency.errors import ConfigError  # noqa: E402
from mllm_efficiency.eval import synthetic  # noqa: E402
from mllm_efficiency.eval.shapes_eval import accuracy  # noqa: E402
from mllm_efficiency.flops import LayerShape, exact_layer_flops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastv_sweep import load, plot_accuracy  # noqa: E402

VISUAL_TOKEN_METHODS = ("fastv", "simignore", "visionzip", "prumerge_plus", "pdrop", "sparsevlm", "dart",
                        "divprune", "random_prune")
CONTROL = "random_prune"


class LayerTokens:
    """Tokens each decoder layer processes in prefills while active (pre-hooks, removed on exit)."""

    def __init__(self, model):
        self.layers = get_adapter(model).layers
        self.calls: list[list[int]] = []
        self._handles = []

    def __enter__(self):
        def hook(i):
            def pre(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if hidden.shape[1] > 1:  # prefill only
                    if i == 0:
                        self.calls.append([])
                    self.calls[-1].append(hidden.shape[1])
            return pre

        self._handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
                         for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def prefill_tflops(model, layer_tokens: list[int]) -> float:
    shape = LayerShape.from_config(model.config)
    head = 2.0 * shape.hidden * shape.vocab
    return (sum(exact_layer_flops(shape, n) for n in layer_tokens) + head) / 1e12


def run_arm(model, proc, samples, entry: str | None, ratio: float, batch_size: int, flops_samples: int) -> dict:
    """Accuracy on `samples`, and the mean prefill TFLOPs / mean tokens per layer of the first `flops_samples`
    questions answered one at a time (no padding). `entry`: a method entry, e.g. 'pdrop:layer_list=2/10/18'."""
    t = time.time()
    handle = None
    if entry:
        (call,) = parse_entry(entry).methods
        handle = me.apply(model, call.name, **{"ratio": ratio, **call.params})
    try:
        probe = LayerTokens(model)
        with probe:
            for s in samples[:flops_samples]:
                accuracy(model, proc, [s], 1)
        acc = accuracy(model, proc, samples, batch_size)
    finally:
        if handle is not None:
            handle.remove()
    per_call = [c for c in probe.calls if len(c) == len(probe.layers)]
    tflops = sum(prefill_tflops(model, c) for c in per_call) / max(1, len(per_call))
    mean_tokens = sum(sum(c) / len(c) for c in per_call) / max(1, len(per_call))
    return {**{f"acc_{k}": round(v, 4) for k, v in acc.items()}, "prefill_tflops": round(tflops, 6),
            "mean_layer_tokens": round(mean_tokens, 1), "seconds": round(time.time() - t, 1)}


def beat_random(rows: list[dict], ratios: list[float]) -> list[str]:
    lines = []
    for r in ratios:
        control = next((x for x in rows if x["method"] == CONTROL and x["ratio"] == r), None)
        if control is None:
            continue
        for x in rows:
            if x["ratio"] != r or x["method"] in (CONTROL, "vanilla"):
                continue
            d = 100 * (x["acc_all"] - control["acc_all"])
            verdict = "beats" if d > 0 else ("ties" if d == 0 else "is below")
            lines.append(f"- R = {r}: {x['method']} {verdict} random pruning by {abs(d):.1f} points "
                         f"({x['acc_all']:.3f} vs {control['acc_all']:.3f})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000, help="held-out questions (test split)")
    p.add_argument("--ratios", default="0.5,0.75,0.9")
    p.add_argument("--methods", nargs="+", default=list(VISUAL_TOKEN_METHODS),
                   help="method entries (NAME or NAME:key=value,...; tuples as a/b/c), each run at every ratio")
    p.add_argument("--resume", action="store_true",
                   help="keep the arms already in OUT/results.json (same n and seed) and run only the missing ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--flops-samples", type=int, default=4, help="questions answered alone to count FLOPs")
    p.add_argument("--weights", default=None, help="trained-weights dir (default: the package assets)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random backbone, 8 questions (pipeline check)")
    args = p.parse_args(argv)
    if args.tiny:
        args.n = min(args.n, 8)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = args.methods
    for m in methods:
        try:
            if len(parse_entry(m).methods) != 1:
                raise ConfigError("one method per entry")
        except ConfigError as e:
            p.error(f"--methods {m!r}: {e}")
    out = Path(args.out)
    previous = []
    if args.resume and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        if (old.get("n"), old.get("seed")) == (args.n, args.seed):
            previous = old["rows"]
            methods = list(dict.fromkeys([r["method"] for r in previous if r["method"] != "vanilla"] + methods))
    model, proc = load(args.tiny, args.weights, args.device)
    samples = synthetic.make_samples(args.n, seed=args.seed, split="test")
    rows, skipped = [], []
    for method, ratio in [(None, 0.0)] + [(m, r) for r in ratios for m in methods]:
        done = next((x for x in previous if x["method"] == (method or "vanilla") and x["ratio"] == ratio), None)
        if done is not None:
            rows.append(done)
            continue
        try:
            row = {"method": method or "vanilla", "ratio": ratio,
                   **run_arm(model, proc, samples, method, ratio, args.batch_size, args.flops_samples)}
        except ConfigError as e:  # e.g. a ratio the method cannot reach on this depth: recorded, not fatal
            print(f"{method} R={ratio}: {e}", flush=True)
            skipped.append({"method": method, "ratio": ratio, "error": str(e)})
            continue
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        row["flops_vs_vanilla"] = round(row["prefill_tflops"] / base["prefill_tflops"], 3)
    out.mkdir(parents=True, exist_ok=True)
    info = {"n": args.n, "seed": args.seed, "device": args.device, "tiny": args.tiny,
            "image_tokens": model.config.image_seq_length, "command": " ".join(sys.argv), "rows": rows,
            "skipped": skipped}
    (out / "results.json").write_text(json.dumps(info, indent=1))
    def cell(m, r, key):
        return next((x[key] for x in rows if x["method"] == m and x["ratio"] == r), "n/a")

    acc_table = [{"method": m, **{f"R={r}": cell(m, r, "acc_all") for r in ratios}} for m in methods]
    flops_table = [{"method": m, **{f"R={r}": cell(m, r, "flops_vs_vanilla") for r in ratios}} for m in methods]
    cols = ["method"] + [f"R={r}" for r in ratios]
    md = (f"# shapes_vqa accuracy per visual-token method ({args.n} held-out questions, "
          f"{model.config.image_seq_length} image tokens, {args.device})\n\n"
          f"Vanilla: {base['acc_all']:.3f}, {base['prefill_tflops'] * 1e3:.2f} GFLOPs per prefill.\n\n"
          "## Exact match\n\n" + markdown_table(acc_table, cols, 3) + "\n\n"
          "## Prefill FLOPs per answer, relative to vanilla (counted from the tokens each layer processed)\n\n"
          + markdown_table(flops_table, cols, 3) + "\n\n## Against random pruning\n\n"
          + "\n".join(beat_random(rows, ratios))
          + "".join(f"\n- {x['method']} at R = {x['ratio']}: not run ({x['error']})" for x in skipped)
          + "\n\n## Every arm\n\n"
          + markdown_table(rows, [k for k in rows[0] if k != "mean_layer_tokens"] + ["mean_layer_tokens"], 4) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    plot_accuracy(out / "accuracy_vs_ratio.png", rows, methods, base["acc_all"], dashed=(CONTROL,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
