#!/usr/bin/env python3
"""Decode speed on full and compressed caches: the plain HF loop vs `FastDecoder` (slot buffers + CUDA graph),
against the bandwidth roofline, all in one run.

For every batch size B, context L and arm (vanilla = no method; `method:ratio` = mllm_efficiency.apply), on
random token ids and a 7B-size random-weight model (bf16, SDPA):
  hf    prefill `model(ids, use_cache=True)`, then `--steps` greedy single-token steps of
        `model(input_ids=tok, cache=..., position_ids=...)` on that cache (the handle stays attached)
  fast  `FastDecoder(model, max_new_tokens)`: the same prefill, the cache copied into static slot buffers, and
        `--steps` greedy steps, each one CUDA-graph replay + argmax
Each decode loop is timed with CUDA events after `--warmup` untimed steps (median of `--repeats` loops on one
prefill; the fast decoder's buffers are sized for all of them).
roofline = (weight bytes read per step + stored KV bytes at the middle of the loop) / measured bandwidth
(the larger of a device copy and a read-only reduction over a large buffer, measured in the same run).

GPU (H100, ~4 minutes), the command whose results are in benchmarks/decode/README.md:
  PYTHONPATH=src python3 benchmarks/decode/bench_fast_decode.py --preset llama-2-7b --device cuda \
      --contexts 1024 32768 --batch 1 2 --arms vanilla snapkv:0.9 --out-dir benchmarks/decode
CPU smoke (seconds; numbers meaningless):
  python benchmarks/decode/bench_fast_decode.py --preset tiny --device cpu --dtype fp32 --contexts 128 \
      --batch 1 2 --steps 4 --repeats 1 --out-dir /tmp/decode
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks" / "kv"))

import torch  # noqa: E402

import mllm_efficiency as me  # noqa: E402
from mllm_efficiency.bench.report import jsonable  # noqa: E402
from mllm_efficiency.core.attachments import cache_kwarg, output_cache  # noqa: E402
from mllm_efficiency.bench.timing import environment_info  # noqa: E402
from mllm_efficiency.fast import FastDecoder  # noqa: E402
from bench_kv import (DTYPES, PRESETS, Clock, build_config, build_model, free_memory, measure_bandwidth,  # noqa: E402
                      read_peak, reset_peak, weight_bytes_read)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-2-7b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--arms", nargs="+", default=["vanilla", "snapkv:0.9"],
                   help="vanilla (no method) or METHOD:RATIO, e.g. snapkv:0.9 streamingllm:0.9")
    p.add_argument("--modes", nargs="+", default=["hf", "fast"], choices=["hf", "fast", "fast-sdpa", "fast-compile", "fast-compile-sdpa"],
                   help="hf = plain loop; fast = FastDecoder (CUDA graph); fast-sdpa = its SDPA attention; "
                        "fast-compile = its torch.compile'd step; fast-compile-sdpa = both")
    p.add_argument("--no-fuse", action="store_true", help="FastDecoder without fused q/k/v and gate/up projections")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per loop")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth-mib", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="write results.json and results.md here")
    return p.parse_args(argv)


def parse_arm(text: str):
    if text == "vanilla":
        return None, 0.0
    method, _, ratio = text.partition(":")
    return method, float(ratio)


def hf_decode(model, ids, args, clock) -> dict:
    ck = cache_kwarg(model)
    B, L = ids.shape
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache = output_cache(out, required=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        stored = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
        pos = torch.full((B, 1), L, dtype=torch.long, device=ids.device)
        del out

        def run(n):
            nonlocal tok
            for _ in range(n):
                o = model(input_ids=tok, position_ids=pos, use_cache=True, **{ck: cache})
                tok = o.logits[:, -1].argmax(-1, keepdim=True)
                pos.add_(1)

        run(args.warmup)
        loops = [clock.run(lambda: run(args.steps))[0] / args.steps for _ in range(args.repeats)]
    return {"step_ms": statistics.median(loops), "loops_ms": loops, "kv_bytes": stored}


def fast_decode(model, ids, args, clock, mode="fast") -> dict:
    dec = FastDecoder(model, max_new_tokens=args.warmup + args.steps * args.repeats + 1,
                      attention="sdpa" if mode.endswith("sdpa") else "matmul", compile="compile" in mode,
                      fuse_projections=not args.no_fuse)
    t0 = time.perf_counter()
    logits = dec.prefill(input_ids=ids)
    clock_prefill = (time.perf_counter() - t0) * 1e3
    state = {"tok": logits.argmax(-1, keepdim=True)}

    def run(n):
        for _ in range(n):
            state["tok"] = dec.step(state["tok"]).argmax(-1, keepdim=True)

    run(args.warmup)
    loops = [clock.run(lambda: run(args.steps))[0] / args.steps for _ in range(args.repeats)]
    result = {"step_ms": statistics.median(loops), "loops_ms": loops, "kv_bytes": dec.kv_bytes,
              "stored_lengths": dec.stored_lengths, "prefill_and_capture_ms": clock_prefill}
    dec.close()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(1)
    t_start = time.perf_counter()
    bw = measure_bandwidth(device, args.bandwidth_mib if device.type == "cuda" else 16)
    model = build_model(args.preset, build_config(args.preset, "sdpa"), device, dtype, args.seed)
    w_read = weight_bytes_read(model)
    clock = Clock(device)
    rows = []
    for B in args.batch:
        for L in args.contexts:
            g = torch.Generator(device="cpu").manual_seed(args.seed + L + B)
            ids = torch.randint(3, model.config.vocab_size, (B, L), generator=g).to(device)
            for arm in args.arms:
                method, ratio = parse_arm(arm)
                handle = me.apply(model, method, ratio=ratio) if method else None
                try:
                    for mode in args.modes:
                        free_memory(device)
                        base = reset_peak(device)
                        if mode == "hf":
                            res = hf_decode(model, ids, args, clock)
                        else:
                            res = fast_decode(model, ids, args, clock, mode)
                        peak = read_peak(device)
                        appended = args.warmup + args.steps * args.repeats / 2
                        kv_mid = res["kv_bytes"] + appended * B * _kv_bytes_per_token(model, dtype)
                        roof_ms = (w_read + kv_mid) / bw["used_bytes_per_s"] * 1e3
                        row = dict(batch=B, context=L, arm=arm, mode=mode, **res, peak_bytes=peak,
                                   peak_over_start=None if peak is None else peak - base,
                                   roofline_ms=roof_ms, vs_roofline=res["step_ms"] / roof_ms,
                                   tokens_per_s=B * 1e3 / res["step_ms"])
                        rows.append(row)
                        print(f"B={B} L={L} {arm:<14} {mode:<4} step {row['step_ms']:7.2f} ms  "
                              f"roofline {roof_ms:6.2f} ms ({row['vs_roofline']:.2f}x)  KV {res['kv_bytes'] / 2**30:6.2f} GiB"
                              f"  {row['tokens_per_s']:8.1f} tok/s", flush=True)
                finally:
                    if handle is not None:
                        handle.remove()
    _speedups(rows)
    result = {"command": "python3 " + " ".join(sys.argv), "environment": environment_info(device),
              "preset": args.preset, "dtype": args.dtype, "bandwidth": bw, "weight_bytes_read": w_read,
              "rows": rows, "total_s": time.perf_counter() - t_start}
    md = render(result)
    print(md)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(jsonable(result), indent=1))
        (out / "results.md").write_text(md)
    return 0


def _kv_bytes_per_token(model, dtype) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def _speedups(rows) -> None:
    """vs vanilla of the same mode / batch / context, and fast vs hf of the same arm."""
    index = {(r["batch"], r["context"], r["arm"], r["mode"]): r for r in rows}
    for r in rows:
        base = index.get((r["batch"], r["context"], "vanilla", r["mode"]))
        r["speedup_vs_vanilla"] = None if base is None else base["step_ms"] / r["step_ms"]
        hf = index.get((r["batch"], r["context"], r["arm"], "hf"))
        r["fast_vs_hf"] = None if hf is None or r["mode"] == "hf" else hf["step_ms"] / r["step_ms"]
        if base is not None:
            r["kv_reduction"] = 1 - r["kv_bytes"] / base["kv_bytes"]


def render(result) -> str:
    env = result["environment"]
    bw = result["bandwidth"]["used_bytes_per_s"]
    lines = [f"## Decode step time: {result['preset']} ({result['dtype']}, random weights), HF loop vs FastDecoder",
             "",
             f"- device: {env.get('gpu') or env.get('cpu')}; torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}; measured bandwidth {bw / 1e12:.2f} TB/s; weights read per step "
             f"{result['weight_bytes_read'] / 1e9:.2f} GB",
             f"- command: `{result['command']}`",
             "- roofline = (weights + stored KV at mid-loop) / bandwidth; x roofline = step / roofline",
             "",
             "| B | context | arm | decode | step ms | tok/s | x roofline | KV GiB | KV removed | speedup vs vanilla "
             "(same decode) | fast vs HF | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['arm']} | {r['mode']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['vs_roofline']:.2f} | {r['kv_bytes'] / 2**30:.2f} | {_pct(r.get('kv_reduction'))} | "
            f"{_x(r.get('speedup_vs_vanilla'))} | {_x(r.get('fast_vs_hf'))} | "
            f"{_gib(r['peak_bytes'])} |")
    lines.append("")
    lines.append(f"Total run time: {result['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def _gib(v) -> str:
    return "-" if v is None else f"{v / 2**30:.1f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
