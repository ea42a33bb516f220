"""`mllm-eff bench`: latency, memory, KV bytes, FLOPs and the decode roofline of method entries on one model.

    mllm-eff bench --model llava-1.5-7b --images 8 --methods vanilla fastv:k=2,ratio=0.75 --out results/
    mllm-eff bench --model llama-3-8b --context 32768 --methods vanilla snapkv:ratio=0.9 --decode both --out r/
    mllm-eff bench --model tiny-llava --images 2 --methods vanilla fastv:k=2,ratio=0.5 --out /tmp/b   # CPU
"""
from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError


def add_commands(sub) -> None:
    from ..cli import _int_at_least
    from .harness import DECODE_BACKENDS, DTYPES
    from .presets import PRESETS

    p = sub.add_parser(
        "bench", help="measure methods on one model and prompt shape: TTFT, decode tok/s, memory, KV, FLOPs",
        description="Measure, in one run, every method entry on one model and prompt shape: vision-encoder "
                    "time, prefill (TTFT), decode tokens/s (plain HF loop and/or the fast static decoder), peak "
                    "and steady GPU memory, stored KV bytes, theoretical prefill FLOPs and the decode bandwidth "
                    "roofline. Writes bench.json, bench.md and bench.png (matplotlib) into --out.",
        epilog="model presets (random weights): " + ", ".join(
            f"{n} ({p.description})" for n, p in PRESETS.items()) +
        ".\nentries: 'vanilla', 'METHOD:key=value,...', chained with '+' (applied in order), e.g. "
        "fastv:k=2,ratio=0.5+snapkv:ratio=0.5. Tuple values separate items with '/'.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a preset above, a zoo alias (smollm2-135m, qwen2.5-coder-0.5b), a .gguf file or an HF "
                        "model directory")
    p.add_argument("--methods", nargs="+", default=["vanilla"], metavar="ENTRY",
                   help="method entries to measure (default: vanilla); list vanilla to get speedups")
    p.add_argument("--images", type=_int_at_least("images", 0), default=0, help="images per prompt; default 0")
    p.add_argument("--tokens-per-image", type=_int_at_least("tokens_per_image", 1), default=None,
                   help="visual tokens per image (a perfect square); presets size their vision tower to it; "
                        "default: the preset's (576 LLaVA-1.5, 729 OneVision / Qwen2-VL)")
    p.add_argument("--frames", type=_int_at_least("frames", 0), default=0,
                   help="video frames per prompt (video models); default 0")
    p.add_argument("--context", type=_int_at_least("context", 1), default=64,
                   help="text tokens per prompt (all of it for text models; around the visuals for VLMs); "
                        "default 64")
    p.add_argument("--batch", type=_int_at_least("batch", 1), default=1, help="identical rows per batch; default 1")
    p.add_argument("--decode", choices=DECODE_BACKENDS, default="hf",
                   help="decode backend: hf (plain HF loop), fast (mllm_efficiency.fast.FastDecoder), both (and "
                        "their ratio), e2e (prompt -> --new-tokens tokens as a user runs it: the model's generate vs "
                        "mllm_efficiency.generate, vision tower included), none; default hf")
    p.add_argument("--new-tokens", type=_int_at_least("new_tokens", 1), default=32,
                   help="timed decode steps per backend; default 32")
    p.add_argument("--decode-warmup", type=_int_at_least("decode_warmup", 0), default=4,
                   help="untimed decode steps first; default 4")
    p.add_argument("--warmup", type=_int_at_least("warmup", 0), default=2, help="untimed prefill calls; default 2")
    p.add_argument("--repeats", type=_int_at_least("repeats", 1), default=5, help="timed prefill calls; default 5")
    p.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2); default sdpa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least("threads", 0), default=0,
                   help="torch CPU threads (0: leave torch's setting)")
    p.add_argument("--bandwidth-mib", type=_int_at_least("bandwidth_mib", 1), default=None,
                   help="buffer of the bandwidth copy; default 2048 on cuda, 64 on cpu")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for bench.json, bench.md, bench.png")
    p.add_argument("--stem", default="bench", help="file name stem of the outputs; default bench")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing entry (default: record "
                                                             "its error and go on)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=lambda args: run(args, p))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .harness import BenchSettings, run_bench
    from .prompts import PromptShape
    from .report import write_bench
    from .specs import parse_entries

    try:
        parse_entries(args.methods)  # fail before anything is built
        shape = PromptShape(context=args.context, images=args.images, tokens_per_image=args.tokens_per_image,
                            frames=args.frames, batch=args.batch)
        settings = BenchSettings(model=args.model, entries=tuple(args.methods), shape=shape, decode=args.decode,
                                 new_tokens=args.new_tokens, decode_warmup=args.decode_warmup, warmup=args.warmup,
                                 repeats=args.repeats, device=args.device, dtype=args.dtype, attn=args.attn,
                                 seed=args.seed, bandwidth_mib=args.bandwidth_mib, keep_going=not args.fail_fast)
    except ConfigError as e:  # one `error:` line, exit 2, nothing built (the style of every mllm-eff verb)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_bench(settings, progress=not args.quiet)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    paths = write_bench(result, args.out, stem=args.stem, plot=not args.no_plot)
    from .report import bench_markdown

    print(bench_markdown(result))
    failed = [r["entry"] for r in result["entries"] if "error" in r]
    if failed:
        print(f"mllm-eff bench: {len(failed)} entr{'y' if len(failed) == 1 else 'ies'} failed: {failed}",
              file=sys.stderr)
        return 1
    print(" ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
