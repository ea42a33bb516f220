"""Decode-step time of the slot attention variants (`FastDecoder(attention=...)`) on one prefill, against the
bandwidth roofline: which kernel the fast path should default to per head layout.

  PYTHONPATH=src python3 benchmarks/e2e/decode_attention.py --preset llama-3-8b --context 32768
"""
from __future__ import annotations

import argparse
import json

import torch

from mllm_efficiency.bench.presets import build_preset
from mllm_efficiency.bench.timing import markdown_table, time_cuda
from mllm_efficiency.fast import FastDecoder
from mllm_efficiency.fast.slots import ATTENTION_KINDS


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--kinds", nargs="+", default=list(ATTENTION_KINDS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model = build_preset(args.preset, "cuda", torch.bfloat16)
    ids = torch.randint(3, 1000, (1, args.context), device="cuda")
    rows = []
    for kind in args.kinds:
        dec = FastDecoder(model, max_new_tokens=args.steps + 4, attention=kind)
        logits = dec.prefill(input_ids=ids)
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(3):
            tok = dec.step(tok).argmax(-1, keepdim=True)
        t = time_cuda(lambda: dec.step(tok), warmup=0, repeats=args.steps, device="cuda")
        rows.append({"attention": kind, "step_ms": t.median_ms, "kv_gib": dec.kv_bytes / 2 ** 30})
        dec.close()
        print(json.dumps(rows[-1]), flush=True)
    print(markdown_table(rows, ["attention", "step_ms", "kv_gib"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "context": args.context, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
