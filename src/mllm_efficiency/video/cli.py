"""`mllm-eff video-trace`, `mllm-eff video-dse`, `mllm-eff trace-convert`: Focus traces and sweeps."""
from __future__ import annotations

import json


def _trace(args) -> int:
    from .tracegen import generate_traces

    summary = generate_traces(args.model, args.dataset, args.samples, args.out, args.seed)
    print(json.dumps({k: summary[k] for k in ("median_index", "trace")}))
    return 0


def _dse(args) -> int:
    from .tracegen import run_dse

    rows = run_dse(args.model, args.sweep, args.samples, args.out, args.seed)
    for r in rows:
        print(f"{r['setting']:>8}  mean sparsity {r['mean_sparsity']:.4f}  {r['trace']}")
    return 0


def _convert(args) -> int:
    import torch

    from .trace import to_reference

    torch.save(to_reference(args.trace), args.output)
    print(f"wrote {args.output}")
    return 0


def add_commands(sub) -> None:
    from .tracegen import DSE_SWEEPS, TINY_MODELS

    p = sub.add_parser("video-trace", help="Focus sparse traces (median of the first N samples) + baseline CSVs")
    p.add_argument("--model", choices=TINY_MODELS, default="tiny-onevision")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=_trace)
    p = sub.add_parser("video-dse", help="Focus design-space sweep: tile, vector or block size")
    p.add_argument("--model", choices=TINY_MODELS, default="tiny-onevision")
    p.add_argument("--sweep", choices=sorted(DSE_SWEEPS), required=True)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=_dse)
    p = sub.add_parser("trace-convert", help="lean trace directory -> Focus simulator dict (.pth)")
    p.add_argument("trace")
    p.add_argument("--to", choices=["focus"], default="focus")
    p.add_argument("--output", required=True)
    p.set_defaults(run=_convert)
