"""Host cost of FastV's hooks during decoding, isolated on CPU with a 32-layer tiny Llama.

    python benchmarks/fastv/decode_overhead.py [--steps 50] [--layers 32]

Both arms run the same greedy loop with explicit position ids; the FastV arm decodes on its statically
pruned cache (R=0.75 of a 150-token span), so its attention is also shorter: the difference is an upper
bound of the per-step Python overhead.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import mllm_efficiency as me  # noqa: E402
from mllm_efficiency.testing import tiny_llama_lm  # noqa: E402
from mllm_efficiency.core.attachments import cache_kwarg  # noqa: E402


def decode_ms(model, ids, steps: int) -> float:
    ck = cache_kwarg(model)
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, tok, L = out.past_key_values, out.logits[:, -1:].argmax(-1), ids.shape[1]
        start = time.perf_counter()
        for i in range(steps):
            out = model(tok, **{ck: cache}, position_ids=torch.tensor([[L + i]]), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_llama_lm(num_layers=args.layers)
    ids = torch.randint(3, 100, (1, 200), generator=torch.Generator().manual_seed(0))
    for _ in range(args.rounds):
        base = decode_ms(model, ids, args.steps)
        with me.apply(model, "fastv", k=2, ratio=0.75, image_token_start_index=10, image_token_length=150):
            fastv = decode_ms(model, ids, args.steps)
        print(f"vanilla {base:.3f} ms/step | fastv {fastv:.3f} ms/step | diff {fastv - base:+.3f} ms")


if __name__ == "__main__":
    main()
