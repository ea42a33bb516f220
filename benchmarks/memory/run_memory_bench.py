"""Long-context accuracy of the memory methods on a real small model (CONTEXT_MEMORY.md section 13/14).

Q-LLM vs InfLLM vs StreamingLLM (memory variant) vs LM-Infinite vs full attention on the synthetic tasks of
mllm_efficiency.eval.longctx (passkey, number_string, kv_retrieval, niah), question first+last or last only.
Every method gets the same attended budget (n_init 128, n_local 1024; InfLLM/Q-LLM add topk 8 x 128-token
blocks = the paper's "2K window"). Writes results.json, results.md and accuracy.png (if matplotlib) to OUT.

    python benchmarks/memory/run_memory_bench.py OUT                      # acceptance: passkey 32k, GPU
    python benchmarks/memory/run_memory_bench.py OUT --gguf /tmp/qwen.gguf --full
    python benchmarks/memory/run_memory_bench.py OUT --tiny               # CPU smoke run (tiny random model)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

METHODS = {
    "qllm": ("qllm", dict(n_init=128, n_local=1024, block_size=128, topk=8, repr_topk=4, max_cached_block=32,
                          exc_block_size=512, question_weight=1.0)),
    "infllm": ("infllm", dict(n_init=128, n_local=1024, block_size=128, topk=8, repr_topk=4, max_cached_block=32,
                              exc_block_size=512)),
    "streamingllm": ("streamingllm_memory", dict(n_init=128, n_local=1024, exc_block_size=512)),
    "lm_infinite": ("lm_infinite", dict(n_init=128, n_local=1024, exc_block_size=512)),
    "full": (None, {}),
}
TINY_SCALE = dict(n_init=8, n_local=64, block_size=16, topk=2, repr_topk=2, max_cached_block=4, exc_block_size=32)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="zoo alias, GGUF file or HF directory")
    p.add_argument("--gguf", default=None, help="path of a GGUF file (overrides --model)")
    p.add_argument("--tasks", default="passkey")
    p.add_argument("--lengths", default="32768")
    p.add_argument("--placements", default="first_last")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n", type=int, default=10, help="samples per (task, length, placement), depths spread 0..1")
    p.add_argument("--full", action="store_true",
                   help="the whole grid: 4 tasks x 8k/16k/32k x first_last/last (long: ~1 h on an H100)")
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random Llama, 600-token prompts")
    return p.parse_args(argv)


def load(args):
    from mllm_efficiency.zoo import load_model, load_tokenizer

    if args.tiny:
        from mllm_efficiency.testing import tiny_llama_lm

        tok = load_tokenizer("smollm2-135m")
        model = tiny_llama_lm(num_layers=2, vocab_size=len(tok), max_position_embeddings=4096)
        return model, tok
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(args.gguf or args.model, dtype=args.dtype if device == "cuda" else "float32", device=device,
                      convert=args.gguf is None)


def run_one(model, tok, sample, method, kwargs, chunk_size, max_new):
    import mllm_efficiency as me
    from mllm_efficiency.eval.longctx import score
    from mllm_efficiency.memory import GreedySearch

    ids = tok(sample.prompt, add_special_tokens=sample.add_special_tokens)["input_ids"]
    handle = me.apply(model, method, **kwargs) if method else None
    try:
        gs = GreedySearch(model, tok)
        q = sample.question if method == "qllm" else None
        t0 = time.perf_counter()
        pred = gs.generate(input_ids=[ids], question=q, max_new_tokens=max_new, chunk_size=chunk_size)[0]
        dt = time.perf_counter() - t0
        st = gs.last_stats
    finally:
        if handle is not None:
            handle.remove()
    return {"id": sample.id, "task": sample.task, "length": sample.target_length, "tokens": len(ids),
            "placement": sample.placement, "depth": sample.depth, "answer": sample.answer, "prediction": pred,
            "score": score(sample.task, pred, sample.answer), "time_s": round(dt, 3),
            "prefill_s": round(st["prefill_time_sec"], 3), "peak_memory_GB": st.get("peak_memory_GB"),
            "question_source": st.get("question_source")}


def main(argv=None) -> int:
    from mllm_efficiency.eval.longctx import DEFAULT_MAX_NEW_TOKENS, make_samples

    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    placements = args.placements.split(",")
    if args.full:
        tasks, lengths, placements = ["passkey", "number_string", "kv_retrieval", "niah"], [8192, 16384, 32768], \
            ["first_last", "last"]
    if args.tiny:
        lengths, args.n = [600], min(args.n, 2)
    methods = args.methods.split(",")
    model, tok = load(args)
    records, summary = [], []
    t_start = time.perf_counter()
    for task in tasks:
        for length in lengths:
            for placement in placements:
                samples = make_samples(task, tok, length, args.n, placement=placement)
                for name in methods:
                    method, kwargs = METHODS[name]
                    kwargs = dict(kwargs, **TINY_SCALE) if args.tiny and method else dict(kwargs)
                    if args.tiny and method in ("streamingllm_memory", "lm_infinite"):
                        kwargs = {k: kwargs[k] for k in ("n_init", "n_local", "exc_block_size")}
                    recs = [run_one(model, tok, s, method, kwargs, args.chunk_size,
                                    min(DEFAULT_MAX_NEW_TOKENS[task], 8 if args.tiny else 100)) for s in samples]
                    for r in recs:
                        r["method"] = name
                    records += recs
                    acc = sum(r["score"] for r in recs) / len(recs)
                    summary.append({"task": task, "length": length, "placement": placement, "method": name,
                                    "accuracy": acc, "n": len(recs),
                                    "mean_time_s": sum(r["time_s"] for r in recs) / len(recs),
                                    "peak_memory_GB": max((r["peak_memory_GB"] or 0) for r in recs) or None})
                    print(f"{task:14s} {length:6d} {placement:10s} {name:13s} acc {acc:.2f} "
                          f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    meta = {"model": args.gguf or args.model, "tiny": args.tiny, "methods": {m: METHODS[m] for m in methods},
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "argv": sys.argv}
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1,
                                                 default=str))
    lines = ["| task | length | placement | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for task in tasks:
        for length in lengths:
            for placement in placements:
                cells = [next(f"{s['accuracy'] * 100:.0f}%" for s in summary if (s["task"], s["length"],
                         s["placement"], s["method"]) == (task, length, placement, m)) for m in methods]
                lines.append(f"| {task} | {length} | {placement} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(summary, methods, out / "accuracy.png")
    return 0


def _plot(summary, methods, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    keys = sorted({(s["task"], s["placement"]) for s in summary})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, (task, placement) in zip(axes[0], keys):
        for m in methods:
            pts = sorted((s["length"], s["accuracy"]) for s in summary
                         if (s["task"], s["placement"], s["method"]) == (task, placement, m))
            ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="o", label=m)
        ax.set_title(f"{task} ({placement})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-5, 105)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
