"""TTFT of video token concentration methods on a LLaVA-Video-7B-size language model (random weights).

The LLM is Qwen2-7B shaped (28 layers, hidden 3584, MLP 18944, 28 heads, 4 KV heads); the vision tower is not
run: it does not depend on the method, and the measured quantity is the LLM prefill. The visual embeddings are
synthetic (frames of 14 x 14 = 196 tokens; a shared base per position plus per-frame noise, with a fraction of
static tokens, so adjacent frames are similar as in real video); they replace the embedding output for the
video span through a forward hook on `embed_tokens`, so the methods see ordinary `input_ids`.

Arms: dense, focus SEC only, focus SEC + token_dedup (the GPU fast path), framefusion cost 0.3, adaptiv, and
cmc (emulation: its time is reported but it is not a speedup method here). TTFT = one prefill forward with a
cache, CUDA events, warm-up, median of repeats. Theoretical ops (MACs) follow VIDEO.md section 3.

    python benchmarks/video/bench_video.py --out results/video            # GPU, ~5 min on an H100
    python benchmarks/video/bench_video.py --tiny --out /tmp/video_tiny   # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

import mllm_efficiency as me  # noqa: E402
from mllm_efficiency.bench.timing import markdown_table, time_cuda  # noqa: E402

QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192)
VISUAL_ID = 151655


def build(cfg: dict, device, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = dict(cfg)
    vocab = c["vocab_size"]
    config = Qwen2Config(**c, attn_implementation="sdpa")
    config.image_token_id = min(VISUAL_ID, vocab - 1)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


def video_prompt(model, frames: int, side: int, device, dtype, static: float = 0.5, noise: float = 0.15):
    H = model.config.hidden_size
    vid = model.config.image_token_id
    per = side * side
    g = torch.Generator(device="cpu").manual_seed(1)
    prefix = torch.randint(10, 1000 if H > 64 else 100, (14,), generator=g)
    question = torch.randint(10, 1000 if H > 64 else 100, (30,), generator=g)
    ids = torch.cat([prefix, torch.full((frames * per,), vid), question]).unsqueeze(0).to(device)
    scale = model.model.embed_tokens.weight.float().std().item()
    base = torch.randn(1, per, H, generator=g) * scale
    moving = torch.rand(frames, per, 1, generator=g) > static
    drift = torch.randn(frames, per, H, generator=g) * scale
    frames_emb = base + noise * drift + moving * drift  # static tokens only carry small noise
    visual = frames_emb.reshape(frames * per, H).to(device, dtype)
    start = prefix.numel()

    def hook(module, args, out):
        if out.shape[1] == ids.shape[1]:
            out = out.clone()
            out[:, start:start + visual.shape[0]] = visual
        return out

    return ids, model.model.embed_tokens.register_forward_hook(hook)


def ops(cfg: dict, tokens_per_layer, rows=None) -> float:
    """MACs of the prefill's decoder layers (VIDEO.md section 3); `rows[(gemm, layer)]` = rows computed."""
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    dkv = H // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    total = 0.0
    for l, n in enumerate(tokens_per_layer):
        r = lambda g: (rows or {}).get((g, l), (n, n))[0]  # noqa: E731
        total += r("q_proj") * H * (H + 2 * dkv) + r("o_proj") * H * H + r("gate_proj") * 2 * H * I \
            + r("down_proj") * H * I + n * n * H
    return total


def arms(T: int, frames: int):
    video = dict(selected_layers=(3, 6, 9, 18, 26), alpha_list=(0.4, 0.3, 0.2, 0.15, 0.1))
    if T < 28:
        video = dict(selected_layers=(0, 1, 2, 3), alpha_list=(0.4, 0.3, 0.2, 0.1))
    common = dict(frames=frames)
    return [("dense", None, {}),
            ("focus_sec", "focus", dict(video, sec_only=True, **common)),
            ("focus_sec_dedup", "focus", dict(video, sic_mode="token_dedup", similarity_threshold=0.9, **common)),
            ("framefusion_0.3", "framefusion", dict(cost=0.3, similarity_lower_bound=0.6, **common)),
            ("adaptiv", "adaptiv", dict(threshold=0.5, **common)),
            ("cmc_emulation", "cmc", dict(**common))]


def run(args) -> dict:
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cfg = TINY if args.tiny else QWEN2_7B
    side = 4 if args.tiny else 14
    model = build(cfg, device, dtype)
    T = cfg["num_hidden_layers"]
    rows = []
    for frames in args.frames:
        ids, handle = video_prompt(model, frames, side, device, dtype, static=args.static, noise=args.noise)
        dense_ms = None
        for name, method, kw in arms(T, frames):
            if name == "cmc_emulation" and not args.with_cmc:
                continue
            h = me.apply(model, method, **kw) if method else None
            try:
                def prefill():
                    with torch.no_grad():
                        return model(input_ids=ids, use_cache=True, logits_to_keep=1)
                out = prefill()
                cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
                lens = [cache.layers[i].keys.shape[-2] for i in range(T)]
                del out, cache
                t = time_cuda(prefill, warmup=args.warmup, repeats=args.repeats, device=device)
                st = h.stats if h else None
                dedup = getattr(st, "dedup_rows", None) or None
                sparsity = None
                if name.startswith("focus") and st.sic_counts:
                    sparsity = sum(st.sic_sparsity(g, l) for g, l in st.sic_counts) / len(st.sic_counts)
                if name == "adaptiv":
                    sparsity = st.token_sparsity
                if name == "cmc_emulation":
                    sparsity = st.linear_sparsity
                row = dict(frames=frames, arm=name, prompt=int(ids.shape[1]), ttft_ms=t.median_ms,
                           p10_ms=t.p10_ms, p90_ms=t.p90_ms, mean_tokens=sum(lens) / T,
                           tmacs=ops(cfg, lens, dedup) / 1e12, sparsity=sparsity,
                           rows_removed_q=st.rows_removed("q_proj") if dedup else None,
                           rows_removed_down=st.rows_removed("down_proj") if dedup else None)
                if name == "dense":
                    dense_ms = t.median_ms
                row["speedup"] = dense_ms / t.median_ms if dense_ms else None
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                if h:
                    h.remove()
        handle.remove()
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", config=cfg, rows=rows,
                static=args.static, noise=args.noise,
                note=f"LLM prefill only (vision tower not run); synthetic temporally-redundant visual embeddings "
                     f"({args.static:.0%} static positions, noise {args.noise}); "
                     "cmc is an emulation (dense GEMMs), its time is not a speedup")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke run)")
    ap.add_argument("--frames", type=int, nargs="+", default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--with-cmc", action="store_true", help="also time the CMC emulation (slow)")
    ap.add_argument("--static", type=float, default=0.5,
                    help="fraction of grid positions that do not move between frames (temporal redundancy)")
    ap.add_argument("--noise", type=float, default=0.15, help="per-frame noise on every token (x embedding std)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.static <= 1.0 or args.noise < 0:
        ap.error(f"--static must be in [0, 1] and --noise >= 0, got {args.static} and {args.noise}")
    args.frames = args.frames or ([4, 8] if args.tiny else [32, 64])
    t0 = time.time()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    cols = ["frames", "arm", "prompt", "ttft_ms", "speedup", "mean_tokens", "tmacs", "sparsity",
            "rows_removed_q", "rows_removed_down"]
    md = f"Device: {res['device']}. {res['note']}.\n\n" + markdown_table(res["rows"], cols, float_digits=3)
    (out / "results.md").write_text(md + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in res["rows"]:
            ax.scatter(r["tmacs"], r["ttft_ms"], label=f"{r['arm']} ({r['frames']}f)")
        ax.set_xlabel("theoretical T MACs"); ax.set_ylabel("TTFT (ms)"); ax.legend(fontsize=6)
        fig.tight_layout(); fig.savefig(out / "ttft_vs_ops.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(md)
    print(f"done in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
