#!/usr/bin/env python
"""Accuracy of the embedded shapes VLM on held-out shapes_video clips vs the video methods' ratio, with random
pruning as the baseline, and theoretical prefill FLOPs per answer.

    # GPU (H100: about 2-3 min for 1,000 clips x 19 configurations; weights from a training run just before):
    PYTHONPATH=src python benchmarks/eval/video_sweep.py --n 1000 --backbone /tmp/smol.gguf \
        --weights $OUT/shapes_vlm --out $OUT/video_sweep
    # CPU smoke run (tiny random backbone, seconds):
    PYTHONPATH=src python benchmarks/eval/video_sweep.py --tiny --limit 20 --out /tmp/video_sweep_tiny

Configurations: vanilla, then every method of --methods (default focus, framefusion, cmc, adaptiv, fastv,
random_prune) at every R of --ratios (default 0.5, 0.75, 0.9). The video methods get `ratio=R, frames=F` (R is
the fraction of visual tokens removed averaged over the decoder layers, docs/video.md "RATIO"); fastv and
random_prune get `k=--k, ratio=R` (R removed from layer K on). Every row records the fraction each method
reports removed (`stats.removed_fraction`; FastV-style: layer-averaged from K and the keep count) and the
theoretical prefill TFLOPs of the language model per answer (`mllm_efficiency.flops.exact_layer_flops` per
layer on the tokens that layer computes; CMC keeps every token in attention and skips the FC rows of its
matched tokens). Both are read from sample 0 of each batch (what the methods' stats keep) and averaged over
batches weighted by their size; all clips have the same visual token count, so a budget method's numbers are
the same for every sample.

Speed: the clips are rendered and tokenised once; batches hold prompts of one token length (no padding, so
every method runs batched), generation stops after the longest answer's token count.

Writes into --out: results.json, results.md (table), and `runs/` in the layout `mllm-eff report` reads (one
lmms-eval-style results file + efficiency summary + per-sample file per configuration), then builds the report
from it: report.md / report.json and the accuracy-vs-TFLOPs frontier plot (report_frontier_shapes_video_*.png,
with matplotlib). `mllm-eff report OUT/runs --out OUT --force` redraws it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import mllm_efficiency as me  # noqa: E402
from mllm_efficiency.bench.timing import markdown_table  # noqa: E402
from mllm_efficiency.eval import shapes_vlm, synthetic  # noqa: E402
from mllm_efficiency.eval.local_processor import pixel_values  # noqa: E402
from mllm_efficiency.eval.shapes_eval import prompt_of  # noqa: E402
from mllm_efficiency.flops import LayerShape, exact_layer_flops  # noqa: E402

VIDEO_METHODS = ("focus", "framefusion", "cmc", "adaptiv")
LAYER_METHODS = ("fastv", "random_prune")  # prune at layer K with FastV's step
METHODS = VIDEO_METHODS + LAYER_METHODS
TASK = "shapes_video"


def load(tiny: bool, weights: str | None, device: str, backbone: str, dtype: torch.dtype):
    if tiny:
        from mllm_efficiency.eval.local_processor import char_tokenizer
        from mllm_efficiency.testing import tiny_llama_lm

        model, proc = shapes_vlm.assemble(tiny_llama_lm(num_layers=4), char_tokenizer(), image_token="<image>")
    else:
        model, proc = shapes_vlm.load_shapes_vlm(weights, backbone=backbone, allow_untrained=False)
    model = model.to(device).eval()
    model.model.language_model.to(dtype)
    model.lm_head.to(dtype)
    return model, proc


def build_batches(samples, processor, batch_size: int, device) -> list[dict]:
    """Batches of equal-length prompts (no padding): {"idx": sample indices, "input_ids", "pixel_values"}."""
    tok = processor.tokenizer
    image_token = processor.image_token
    n_img = processor.num_image_tokens if hasattr(processor, "num_image_tokens") else None
    size = processor.image_processor.size["height"]
    if n_img is None:
        n_img = (size // processor.patch_size) ** 2
    by_len: dict[int, list[tuple[int, list[int]]]] = defaultdict(list)
    for i, s in enumerate(samples):
        prompt = prompt_of(processor, s).replace(image_token, image_token * n_img)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        by_len[len(ids)].append((i, ids))
    batches = []
    for _, items in sorted(by_len.items()):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pix = torch.cat([pixel_values(synthetic.render_frames(samples[i], size), size) for i, _ in chunk])
            batches.append({"idx": [i for i, _ in chunk], "input_ids": torch.tensor([ids for _, ids in chunk]),
                            "pixel_values": pix.to(device)})
    return batches


def layer_visual_counts(name: str, stats, config, num_visual: int, num_layers: int) -> list[int] | None:
    """Visual tokens each decoder layer computes (sample 0), where the method records or implies them."""
    if name in ("focus", "framefusion"):
        per = list(getattr(stats, "visual_per_layer" if name == "focus" else "layer_visual", []) or [])
        return (per + [num_visual] * num_layers)[:num_layers] if per else None
    if name == "adaptiv" and stats.dropped:
        return [num_visual - stats.dropped[0]] * num_layers
    if name in LAYER_METHODS and stats.keep_count:
        k = min(config.k, num_layers)
        return [num_visual] * k + [stats.keep_count[0]] * (num_layers - k)
    return None


def attention_flops(shape: LayerShape, n: int) -> float:
    return 2.0 * shape.num_heads * shape.head_dim * n * n  # QK^T and AV, causal half (as exact_layer_flops)


def prefill_tflops(shape: LayerShape, prompt_len: int, num_visual: int, counts: list[int] | None,
                   fc_sparsity: float = 0.0) -> float:
    """LLM prefill FLOPs per answer (T): every layer on its text + visual tokens, plus the LM head (last row).
    `fc_sparsity` (CMC): that share of the visual rows skips the linear layers but stays in attention."""
    text = prompt_len - num_visual
    counts = counts if counts is not None else [num_visual] * shape.num_layers
    total = 2.0 * shape.hidden * shape.vocab if shape.vocab > 0 else 0.0
    for v in counts:
        n = text + v
        if fc_sparsity:
            lin = text + round(v * (1 - fc_sparsity))
            total += exact_layer_flops(shape, lin) - attention_flops(shape, lin) + attention_flops(shape, n)
        else:
            total += exact_layer_flops(shape, n)
    return total / 1e12


def removed_fraction(name: str, stats, counts, num_visual: int) -> float | None:
    if name in LAYER_METHODS:
        return 1.0 - sum(counts) / (len(counts) * num_visual) if counts else None
    value = getattr(stats, "removed_fraction", None)
    return float(value) if value is not None else None


@torch.inference_mode()
def run_config(model, processor, samples, batches, name: str | None, kwargs: dict, max_new: int, shape) -> dict:
    tok = processor.tokenizer
    replies: list[str | None] = [None] * len(samples)
    removed, tflops, weights, notes = [], [], [], set()
    handle = me.apply(model, name, **kwargs) if name else None
    vis_dtype = next(model.model.vision_tower.parameters()).dtype
    try:
        for b in batches:
            ids = b["input_ids"].to(model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=b["pixel_values"].to(vis_dtype), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            for i, row in zip(b["idx"], out[:, ids.shape[1]:]):
                replies[i] = tok.decode(row, skip_special_tokens=True)
            num_visual = int((ids[0] == model.config.image_token_id).sum())
            counts, frac, fc = None, 0.0, 0.0
            if handle is not None:
                st = handle.stats
                counts = layer_visual_counts(name, st, handle.config, num_visual, shape.num_layers)
                frac = removed_fraction(name, st, counts, num_visual)
                fc = float(st.linear_sparsity) if name == "cmc" else 0.0
                if getattr(st, "ratio_note", None):
                    notes.add(st.ratio_note)
            removed.append(frac)
            tflops.append(prefill_tflops(shape, ids.shape[1], num_visual, counts, fc))
            weights.append(len(b["idx"]))
    finally:
        if handle is not None:
            handle.remove()

    def mean(vals):
        pairs = [(v, w) for v, w in zip(vals, weights) if v is not None]
        return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None

    hits, totals = defaultdict(float), defaultdict(int)
    scores = []
    for s, r in zip(samples, replies):
        score = synthetic.exact_match(r, s.answer)
        scores.append(score)
        hits[s.qtype] += score
        totals[s.qtype] += 1
    acc = {q: hits[q] / totals[q] for q in sorted(totals)}
    acc["all"] = sum(scores) / len(scores)
    return {"acc": acc, "removed_fraction": mean(removed), "tflops": mean(tflops), "replies": replies,
            "scores": scores, "notes": sorted(notes)}


def write_report_run(root: Path, row: dict, samples, replies, scores, stamp: str) -> None:
    """One configuration in the file layout `mllm-eff report` collects (lmms-eval results JSON, efficiency
    summary beside its log, per-sample JSON lines for loyalty)."""
    d = root / TASK / f"{row['method']}_{row['ratio']:g}"
    d.mkdir(parents=True, exist_ok=True)
    log = Path(TASK) / d.name / "efficiency.jsonl"  # relative: found under RESULTS_DIR by its trailing parts
    args = f"pretrained=shapes-vlm,method={row['method']},ratio={row['ratio']:g},efficiency_log={log}"
    results = {"results": {TASK: {"alias": TASK, "exact_match,none": row["acc_all"]}},
               "config": {"model": "mllm_eff", "model_args": args},
               "n-samples": {TASK: {"original": len(samples), "effective": len(samples)}}}
    (d / f"{stamp}_results.json").write_text(json.dumps(results, indent=1))
    (d / "efficiency.summary.json").write_text(json.dumps({
        "samples": len(samples), "mean_prefill_tflops": row["tflops"],
        "mean_kept_tokens": row["mean_kept_tokens"], "requested_ratio": row["ratio"],
        "removed_fraction": row["removed_fraction"]}, indent=1))
    with open(d / f"{stamp}_samples_{TASK}.jsonl", "w") as f:
        for i, (s, r, sc) in enumerate(zip(samples, replies, scores)):
            f.write(json.dumps({"doc_id": i, "target": s.answer, "filtered_resps": [r], "exact_match": sc}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000, help="held-out clips (test split)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT clips (smoke runs)")
    p.add_argument("--frames", type=int, default=synthetic.VIDEO_FRAMES)
    p.add_argument("--ratios", default="0.5,0.75,0.9")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--k", type=int, default=2, help="layer K of fastv / random_prune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weights", default=None, help="trained-weights dir (default: the package assets)")
    p.add_argument("--backbone", default=shapes_vlm.BACKBONE, help="zoo alias or GGUF path of the LLM backbone")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="LLM dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--tiny", action="store_true", help="tiny random backbone (pipeline check; chance accuracy)")
    p.add_argument("--no-report", action="store_true", help="skip the `mllm-eff report` files")
    args = p.parse_args(argv)
    n = min(args.n, args.limit) if args.limit else args.n
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; known: {list(METHODS)}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                            else torch.float32)
    t0 = time.time()
    model, proc = load(args.tiny, args.weights, args.device, args.backbone, dtype)
    tok = proc.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    samples = synthetic.make_video_samples(n, seed=args.seed, split="test", frames=args.frames)
    batches = build_batches(samples, proc, args.batch_size, args.device)
    max_new = max(len(tok.encode(s.answer, add_special_tokens=False)) for s in samples)
    shape = LayerShape.from_config(model.config.text_config)
    print(f"model + {n} clips ({len(batches)} batches, {args.frames} frames, "
          f"{model.config.image_seq_length} tokens/frame) ready in {time.time() - t0:.1f}s; "
          f"max_new_tokens={max_new}", flush=True)

    configs = [("vanilla", 0.0, None, {})]
    for r in ratios:
        for m in methods:
            kw = dict(k=args.k, ratio=r) if m in LAYER_METHODS else dict(ratio=r, frames=args.frames)
            if m == "random_prune":
                kw["seed"] = args.seed
            configs.append((m, r, m, kw))
    rows, stamp = [], time.strftime("%Y%m%d_%H%M%S")
    runs = Path(args.out) / "runs"
    num_visual = args.frames * model.config.image_seq_length
    for label, ratio, name, kw in configs:
        t = time.time()
        try:
            got = run_config(model, proc, samples, batches, name, kw, max_new, shape)
        except Exception as exc:  # one failing configuration must not cost the others (a GPU run is one shot)
            print(f"{label} @ {ratio:g} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            rows.append({"method": label, "ratio": ratio, "error": f"{type(exc).__name__}: {exc}"})
            continue
        removed = got["removed_fraction"] or 0.0
        row = {"method": label, "ratio": ratio, "removed_fraction": got["removed_fraction"],
               "mean_kept_tokens": num_visual * (1 - removed), "tflops": got["tflops"],
               **{f"acc_{k}": v for k, v in got["acc"].items()}, "seconds": round(time.time() - t, 1)}
        if got["notes"]:
            row["notes"] = got["notes"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
        if not args.no_report:
            write_report_run(runs, row, samples, got["replies"], got["scores"], stamp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"task": TASK, "n": n, "frames": args.frames, "tokens_per_frame": model.config.image_seq_length,
            "k": args.k, "seed": args.seed, "device": args.device, "dtype": str(dtype), "tiny": args.tiny,
            "weights": args.weights, "backbone": args.backbone, "seconds": round(time.time() - t0, 1),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    failed = [r for r in rows if "error" in r]
    rows = info["rows"] = [r for r in rows if "error" not in r]
    qcols = [f"acc_{q}" for q in synthetic.VIDEO_QUESTION_TYPES if any(f"acc_{q}" in r for r in rows)]
    for r in rows:
        r["gflops"] = r["tflops"] * 1e3 if r.get("tflops") is not None else None
    cols = ["method", "ratio", "removed_fraction", "gflops", "acc_all", *qcols, "seconds"]
    base = rows[0]["acc_all"] if rows and rows[0]["method"] == "vanilla" else float("nan")
    verdict = []
    for r in ratios:
        rnd = next((x for x in rows if x["method"] == "random_prune" and x["ratio"] == r), None)
        if rnd is None:
            continue
        beat = [x["method"] for x in rows if x["ratio"] == r and x["method"] in VIDEO_METHODS
                and x["acc_all"] > rnd["acc_all"]]
        verdict.append(f"- R = {r:g}: random_prune {rnd['acc_all']:.3f}; video methods above it: "
                       + (", ".join(beat) if beat else "none"))
    md = (f"# {TASK}: accuracy vs ratio ({n} held-out clips of {args.frames} frames x "
          f"{model.config.image_seq_length} tokens, vanilla {base:.3f})\n\n" + markdown_table(rows, cols, 3)
          + "\n\n`ratio`: requested; `removed_fraction`: what the method reports (layer-averaged share of the "
          "visual tokens removed); `gflops`: theoretical LLM prefill GFLOPs per answer. fastv / random_prune: "
          f"K={args.k}, R removed from layer K on.\n\n" + "\n".join(verdict) + "\n")
    if failed:
        md += "\nFailed configurations:\n" + "\n".join(f"- {r['method']} @ {r['ratio']:g}: {r['error']}"
                                                     for r in failed) + "\n"
    info["failed"] = failed
    (out / "results.json").write_text(json.dumps(info, indent=1))
    notes = sorted({nt for r in rows for nt in r.get("notes", [])})
    if notes:
        md += "\nNotes from the methods:\n" + "\n".join(f"- {nt}" for nt in notes) + "\n"
    (out / "results.md").write_text(md)
    print(md)
    if not args.no_report:
        from mllm_efficiency.eval.report import build_report

        print(build_report(runs, out, force=True))
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
