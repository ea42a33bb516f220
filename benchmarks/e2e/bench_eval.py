"""Evaluation throughput through `scripts/run_eval.sh`: the plugin's stock path (`fast=false`) against the fast path.

Builds a random-weight model of a preset (LLaVA-1.5-7B size by default), saves it as a local model directory with
a locally built processor (character tokenizer, CLIP-style image processor; no hub), then runs
`bash scripts/run_eval.sh shapes_vqa DIR METHOD RATIO --limit N --method_args fast=... --batch_size B` for each
arm, and reads samples/s from the plugin's efficiency summary (generation wall time of `generate_until`, model
loading excluded). The embedded `shapes-vlm` is measured the same way with `--models shapes-vlm`.

  PYTHONPATH=src python3 benchmarks/e2e/bench_eval.py --preset llava-1.5-7b --limit 200 --out-dir benchmarks/e2e
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def build_model_dir(preset: str, root: Path) -> Path:
    from mllm_efficiency.bench.presets import PRESETS, build_preset, image_side
    from mllm_efficiency.eval.local_processor import char_tokenizer, llava_processor

    model = build_preset(preset, "cuda", torch.bfloat16)
    p = PRESETS[preset]
    vocab = model.config.text_config.vocab_size
    tok = char_tokenizer(vocab_size=vocab, image_token_id=model.config.image_token_id)
    proc = llava_processor(tok, image_size=image_side(p, p.tokens_per_image), patch_size=p.vision["patch_size"])
    out = root / preset
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def run_arm(model: str, method: str, ratio: float, fast: str, batch: int, limit: int, results: Path) -> dict:
    args = ["bash", str(REPO / "scripts" / "run_eval.sh"), "shapes_vqa", model, method, str(ratio),
            "--limit", str(limit), "--method_args", f"fast={fast}", "--batch_size", str(batch),
            "--results_root", str(results)]
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr)[-2000:]}
    summaries = sorted(results.rglob("efficiency.summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summaries[-1].read_text())
    scores = sorted(results.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    score = json.loads(scores[-1].read_text())["results"]["shapes_vqa"]["exact_match,none"] if scores else None
    return {"samples": summary["samples"], "samples_per_s": summary.get("samples_per_s"),
            "generate_s": summary.get("generate_seconds"), "prefill_ms": summary.get("mean_prefill_ms"),
            "exact_match": score, "paths": summary.get("paths")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llava-1.5-7b")
    ap.add_argument("--models", nargs="+", default=["preset", "shapes-vlm"])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes of the fast arms")
    ap.add_argument("--methods", nargs="+", default=["vanilla", "fastv"], choices=["vanilla", "fastv"])
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model in args.models:
            path = str(build_model_dir(args.preset, tmp)) if model == "preset" else model
            name = args.preset if model == "preset" else model
            for method, ratio in [(m, 0 if m == "vanilla" else 0.75) for m in args.methods]:
                arms = [("false", 1)] + [("true", b) for b in args.batch]
                base = None
                for fast, batch in arms:
                    res = run_arm(path, method, ratio, fast, batch, args.limit, tmp / "results" / name)
                    row = {"model": name, "method": method if method == "vanilla" else f"fastv R={ratio}",
                           "path": "stock" if fast == "false" else "fast", "batch": batch, **res}
                    if fast == "false":
                        base = res.get("samples_per_s")
                    if base and res.get("samples_per_s"):
                        row["vs stock"] = res["samples_per_s"] / base
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.out_dir:
        from mllm_efficiency.bench.timing import environment_info, markdown_table

        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cols = ["model", "method", "path", "batch", "samples", "samples_per_s", "vs stock", "prefill_ms",
                "exact_match", "error"]
        cols = [c for c in cols if any(c in r for r in rows)]
        (out / "eval_throughput.json").write_text(json.dumps({"rows": rows, "environment": environment_info("cuda"),
                                                              "command": " ".join(sys.argv)}, indent=1))
        (out / "eval_throughput.md").write_text(markdown_table(rows, cols) + "\n")


if __name__ == "__main__":
    main()
