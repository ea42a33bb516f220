"""Where the time of one KV-compressed sample goes (prefill vs decode), per method, on the GPU.

    PYTHONPATH=src python3 benchmarks/kv/profile_methods.py [--length 16384] [--methods snapkv pyramidkv adakv]

Random-weight Qwen2.5-0.5B-shape model (24 layers, 14 heads, 2 KV heads), bf16, SDPA; prints prefill ms,
decode ms/step and, for the slowest arm, the host functions with the most own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import mllm_efficiency as me  # noqa: E402
from mllm_efficiency.bench.models import build_random_model  # noqa: E402
from mllm_efficiency.core.attachments import cache_kwarg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--methods", nargs="+", default=["snapkv", "pyramidkv", "adakv", "h2o"])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                      rope_theta=1e6, attn_implementation="sdpa")
    model = build_random_model(Qwen2ForCausalLM, cfg, args.device, torch.bfloat16, 0)
    ck = cache_kwarg(model)
    ids = torch.randint(0, 150000, (1, args.length), device=args.device)
    L = args.length

    def sample():
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sync(); t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        sync(); t1 = time.perf_counter()
        cache, tok = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1:].argmax(-1)
        for i in range(args.steps):
            out = model(tok, **{ck: cache}, position_ids=torch.tensor([[L + i]], device=args.device), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        sync(); t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / args.steps

    with torch.inference_mode():
        sample()
        rows = [("none",) + sample()]
        for m in args.methods:
            with me.apply(model, m, ratio=0.5):
                sample()
                rows.append((m,) + sample())
        for name, pre, dec in rows:
            print(f"{name:12s} prefill {pre:8.1f} ms   decode {dec:7.2f} ms/step")
        slow = max(rows[1:], key=lambda r: r[1] + args.steps * r[2])[0]
        for phase in ("prefill", "decode"):
            with me.apply(model, slow, ratio=0.5):
                prof = cProfile.Profile()
                prof.enable()
                sample()
                prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
            print(f"--- {slow}: cProfile of one sample (prefill + {args.steps} steps)\n" + buf.getvalue()[-3500:])
            break


if __name__ == "__main__":
    main()
