#!/usr/bin/env python
"""Accuracy of the embedded shapes VLM vs FastV's R, against random pruning (FastV with scorer=random).

    PYTHONPATH=src python benchmarks/eval/fastv_sweep.py --out benchmarks/eval/results          # trained weights
    PYTHONPATH=src python benchmarks/eval/fastv_sweep.py --tiny --out /tmp/fastv_sweep_tiny      # seconds, pipeline

Writes results.json, results.md (table) and accuracy_vs_ratio.png (if matplotlib is installed) into --out.
Runs on CPU (~1 min per configuration at 200 questions) or GPU (--device cuda). No lmms-eval needed: the same
questions and exact-match scoring as the lmms-eval task shapes_vqa, called directly.
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
from mllm_efficiency.bench.timing import markdown_table  # noqa: E402
from mllm_efficiency.eval import shapes_vlm, synthetic  # noqa: E402
from mllm_efficiency.eval.shapes_eval import accuracy  # noqa: E402
from mllm_efficiency.flops import keep_count  # noqa: E402


def load(tiny: bool, weights: str | None, device: str, backbone: str = shapes_vlm.BACKBONE):
    if tiny:
        from mllm_efficiency.eval.local_processor import char_tokenizer
        from mllm_efficiency.testing import tiny_llama_lm

        model, proc = shapes_vlm.assemble(tiny_llama_lm(num_layers=4), char_tokenizer(), image_token="<image>")
    else:
        model, proc = shapes_vlm.load_shapes_vlm(weights, backbone=backbone, allow_untrained=False)
    return model.to(device).eval(), proc


def plot_accuracy(path: Path, rows: list[dict], methods: list[str], base: float, dashed: tuple = ()) -> None:
    """Accuracy vs R, one line per method, from (ratio 0, vanilla `base`); skipped without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = [(0.0, base)] + [(r["ratio"], r["acc_all"]) for r in rows if r["method"] == m]
        ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m in dashed else "-")
    ax.set(xlabel="R (fraction of image tokens removed)", ylabel="exact match", title="shapes_vqa")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=200, help="held-out questions (test split)")
    p.add_argument("--ratios", default="0,0.25,0.5,0.75,0.9")
    p.add_argument("--k", type=int, default=2, help="FastV layer K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--weights", default=None, help="trained-weights dir (default: the package assets)")
    p.add_argument("--backbone", default=shapes_vlm.BACKBONE, help="zoo alias or GGUF path of the LLM backbone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scorers", default="last_row",
                   help="comma-separated FastV attention scorers to compare with random (last_row, text_rows, all_rows)")
    p.add_argument("--tiny", action="store_true", help="tiny random backbone, 8 questions (pipeline check)")
    args = p.parse_args(argv)
    if args.tiny:
        args.n, args.ratios = min(args.n, 8), "0,0.75"
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, proc = load(args.tiny, args.weights, args.device, args.backbone)
    samples = synthetic.make_samples(args.n, seed=args.seed, split="test")
    rows = []
    scorers = [sc.strip() for sc in args.scorers.split(",") if sc.strip()]
    arms = [("fastv" if sc == "last_row" else f"fastv-{sc}", sc) for sc in scorers] + [("random", "random")]
    configs = [("vanilla", 0.0, None)] + [(name, r, scorer) for r in ratios if r > 0 for name, scorer in arms]
    for label, ratio, scorer in configs:
        t = time.time()
        if scorer is None:
            acc = accuracy(model, proc, samples, args.batch_size)
        else:
            with me.apply(model, "fastv", k=args.k, ratio=ratio, scorer=scorer, seed=args.seed):
                acc = accuracy(model, proc, samples, args.batch_size)
        rows.append({"method": label if scorer else "vanilla", "ratio": ratio, "kept_visual_tokens":
                     keep_count(model.config.image_seq_length, ratio), **{f"acc_{k}": v for k, v in acc.items()},
                     "seconds": round(time.time() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"n": args.n, "k": args.k, "seed": args.seed, "device": args.device, "tiny": args.tiny,
            "image_tokens": model.config.image_seq_length, "rows": rows}
    (out / "results.json").write_text(json.dumps(info, indent=1))
    cols = ["method", "ratio", "kept_visual_tokens", "acc_all", "acc_colour", "acc_count", "acc_exist",
            "acc_relpos", "seconds"]
    md = (f"# shapes_vqa accuracy vs FastV R (K={args.k}, {args.n} held-out questions, "
          f"{model.config.image_seq_length} image tokens)\n\n" + markdown_table(rows, cols, 3) + "\n\n"
          "`fastv` = FastV with the paper code's scorer (last_row); `fastv-<scorer>` = another attention scorer; "
          "`random` = FastV with scorer=random (same K, same kept count).\n")
    (out / "results.md").write_text(md)
    print(md)
    plot_accuracy(out / "accuracy_vs_ratio.png", rows, [name for name, _ in arms], rows[0]["acc_all"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
