#!/usr/bin/env python3
"""FastV GPU latency benchmark: TTFT, ideal pruned shape, FLOPs, peak memory, decode tokens/s, all in one run.

The language model of LLaVA-1.5-7B (Llama-2-7B shape, vocab 32064) with random weights (latency does not
depend on weight values) in bf16 with SDPA. The prompt is [36 prefix tokens][images x 576 image tokens]
[24 text tokens]; the visual span is given to FastV as image_token_start_index / image_token_length, so no
vision tower runs: TTFT here is the LLM prefill (`model(ids, use_cache=True, logits_to_keep=1)`).

For every prompt shape and every R the script measures:
  vanilla    the unmodified model's prefill at L tokens (TTFT), its peak memory and decode tokens/s
  fastv      the same with `me.apply(model, "fastv", k=K, ratio=R)` (inplace), peak memory, decode tokens/s on
             the statically pruned cache (layers >= K hold only the kept tokens)
  ideal      the unmodified model's cost of the pruned shape: layers[:K] at L plus layers[K:] at
             L' = L - (N - keep), measured directly by slicing `model.model.layers` (minus one "shell" call
             at L' -- embeddings, RoPE table, final norm, LM head on 1 token -- that the two segment calls count
             twice), and also interpolated as K/T * t_full(L) + (T-K)/T * t_full(L')
  overhead   fastv / ideal - 1: what scoring, gathers and hooks cost (acceptance: < 10% at 8x576, R=0.75)
  FLOPs      paper Eq. 5 ratio and exact prefill ratio (pruned / baseline) from mllm_efficiency.flops

GPU (H100, ~1.5-3 min):
  PYTHONPATH=src python3 benchmarks/fastv/bench_fastv.py --preset llava-1.5-7b --device cuda --dtype bf16 \
      --attn sdpa --images 1 8 --k 2 --ratios 0.25 0.5 0.75
CPU smoke (seconds):
  python benchmarks/fastv/bench_fastv.py --preset tiny --device cpu --dtype fp32 --repeats 2 --warmup 1 \
      --out /tmp/fv.json --markdown /tmp/fv.md
"""
from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
try:
    import mllm_efficiency  # noqa: F401
except ImportError:  # run from a checkout without installation
    sys.path.insert(0, str(REPO / "src"))
    import mllm_efficiency  # noqa: F401

import torch

import mllm_efficiency as me
from mllm_efficiency.bench.timing import (GIB, environment_info, markdown_table, peak_memory, synchronize,
                                          time_cuda)
from mllm_efficiency.flops import visual_keep_count as keep_count  # noqa: E402
from mllm_efficiency.bench.models import build_random_model, ideal_pruned_shape  # noqa: E402
from mllm_efficiency.bench.report import write_outputs  # noqa: E402
from mllm_efficiency.core.attachments import cache_kwarg, output_cache  # noqa: E402

# ------------------------------------------------------------------------------------------------ presets
PRESETS = {
    # LLaVA-1.5-7B language model (Vicuna-7B v1.5 = Llama-2-7B shape; LLaVA's vocab 32064)
    "llava-1.5-7b": dict(
        config=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                    rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        tokens_per_image=576, decode_tokens=32),
    # CPU smoke run
    "tiny": dict(
        config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                    rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                    initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        tokens_per_image=16, decode_tokens=8),
}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
ACCEPT_IMAGES, ACCEPT_RATIO, ACCEPT_OVERHEAD = 8, 0.75, 0.10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation of the model (same in every arm)")
    p.add_argument("--images", type=int, nargs="+", default=[1, 8],
                   help="prompt shapes: number of images (each --tokens-per-image visual tokens, one contiguous span)")
    p.add_argument("--tokens-per-image", type=int, default=None, help="default: 576 (llava-1.5-7b), 16 (tiny)")
    p.add_argument("--prefix", type=int, default=36, help="text tokens before the visual span (LLaVA-1.5: 36)")
    p.add_argument("--text", type=int, default=24, help="text tokens after the visual span")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--k", type=int, default=2, help="FastV K: first layer that runs on the pruned sequence")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="FastV R (fraction dropped)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-time", type=float, default=None,
                   help="raise the timed calls of a TTFT measurement to about this many seconds in total "
                        "(short launch-bound prefills get more samples, up to 200); default 2.0 on cuda, 0 on cpu")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="greedy decode steps timed after a prefill (0: skip); default 32 (tiny: 8)")
    p.add_argument("--decode-repeats", type=int, default=None,
                   help="timed decode loops, after min(1, --warmup) warm-up loop(s); default min(3, --repeats)")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads with --device cpu (1 keeps a smoke run stable on a shared machine)")
    p.add_argument("--no-interp", action="store_true", help="skip the full-model timings at L' (interpolated ideal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the raw results as JSON here (default: not written)")
    p.add_argument("--markdown", default=None, help="write the markdown tables here (default: stdout only)")
    args = p.parse_args(argv)
    if args.min_time is None:
        args.min_time = 2.0 if torch.device(args.device).type == "cuda" else 0.0
    if args.decode_tokens is None:
        args.decode_tokens = PRESETS[args.preset]["decode_tokens"]
    if args.decode_repeats is None:
        args.decode_repeats = min(3, args.repeats)
    if args.tokens_per_image is None:
        args.tokens_per_image = PRESETS[args.preset]["tokens_per_image"]
    for r in args.ratios:
        if not 0.0 <= r < 1.0:
            p.error(f"--ratios: every R must be in [0, 1), got {r}")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.decode_repeats < 1:
        p.error("need --repeats >= 1, --warmup >= 0, --batch >= 1, --decode-repeats >= 1")
    return args


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """rich progress bar when rich imports and stderr is a terminal; plain lines on stderr otherwise."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self._rich = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                           TimeElapsedColumn)

                self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=Console(stderr=True))
                self._rich.start()
                self._task = self._rich.add_task("FastV bench", total=total)
            except Exception:
                self._rich = None

    def start(self, desc: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=desc)
        else:
            print(f"[{self.done + 1}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {desc}", file=sys.stderr,
                  flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)

    def log(self, msg: str) -> None:
        if self._rich is not None:
            self._rich.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


# ------------------------------------------------------------------------------------------------ model
def build_config(preset: str, attn: str):
    from transformers import LlamaConfig

    cfg = dict(PRESETS[preset]["config"])
    params = getattr(LlamaConfig, "__dataclass_fields__", None) or inspect.signature(LlamaConfig).parameters
    theta = cfg.pop("rope_theta")
    if "rope_parameters" in params:  # transformers 5.x
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:  # 4.x
        cfg["rope_theta"] = theta
    return LlamaConfig(**cfg, attn_implementation=attn)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int):
    """Random-init LlamaForCausalLM built directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    return build_random_model(LlamaForCausalLM, config, device, dtype, seed)


def stored_lengths(cache) -> list[int] | None:
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    return [int(layer.get_seq_length()) for layer in layers]


# ------------------------------------------------------------------------------------------------ measures
class Bench:
    def __init__(self, model, args, device: torch.device):
        self.model, self.args, self.device = model, args, device
        self.ck = cache_kwarg(model)

    def prefill(self, ids):
        return self.model(ids, use_cache=True, logits_to_keep=1)

    def ttft(self, ids):
        a = self.args
        return time_cuda(lambda: self.prefill(ids), warmup=a.warmup, repeats=a.repeats, device=self.device,
                         min_time_s=a.min_time)

    def memory(self, ids):
        gc.collect()
        return peak_memory(lambda: self.prefill(ids), device=self.device)

    def decode(self, ids) -> dict | None:
        """Greedy decode of --decode-tokens single-token steps after an (untimed) prefill, explicit positions."""
        a = self.args
        n = a.decode_tokens
        if n <= 0:
            return None
        B, L = ids.shape
        positions = torch.arange(L, L + n, device=self.device).unsqueeze(0)
        info: dict = {}

        def setup():
            out = self.prefill(ids)
            cache = output_cache(out, required=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return [cache, tok]

        def loop(state):
            cache, tok = state
            for j in range(n):
                out = self.model(tok, position_ids=positions[:, j:j + 1], use_cache=True, logits_to_keep=1,
                                 **{self.ck: cache})
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            info["cache_lengths_after"] = stored_lengths(cache)
            state.clear()

        t = time_cuda(loop, warmup=min(1, a.warmup), repeats=a.decode_repeats, device=self.device, setup=setup)
        per_step = t.median_ms / n
        return {"tokens": n, "batch": B, "loop": t.as_dict(), "ms_per_step": per_step,
                "tokens_per_s": B * n / (t.median_ms / 1e3), "cache_lengths_after": info.get("cache_lengths_after")}

    def ideal(self, ids, k: int, lp: int, t_full_l, t_full_lp) -> dict:
        """Cost of the pruned shape on the unmodified model (see module docstring)."""
        return ideal_pruned_shape(self.ttft, self.model.model, ids, ids[:, :lp], k, t_full_l, t_full_lp)


_FLOPS_WARNED: set = set()


def _flops_note(msg: str) -> None:
    if msg not in _FLOPS_WARNED:
        _FLOPS_WARNED.add(msg)
        print(f"note: {msg}; FLOPs ratios are n/a", file=sys.stderr)


def flops_report(config, prefix: int, n_visual: int, text: int, k: int, ratio: float) -> dict | None:
    """paper Eq. 5 and exact prefill FLOPs ratios (pruned / baseline); None if the flops module is missing."""
    try:
        from mllm_efficiency import flops as F
    except Exception as exc:  # module not there (yet): print n/a
        _flops_note(f"mllm_efficiency.flops unavailable ({type(exc).__name__}: {exc})")
        return None
    try:
        shape = F.LayerShape.from_config(config)
        rep = F.fastv_flops(shape, prefix, n_visual, text, k, ratio)
        out = {name: getattr(rep, name) for name in ("paper_eq5_ratio", "exact_ratio", "equivalent_tokens", "keep")}
        if hasattr(rep, "as_dict"):
            out["report"] = rep.as_dict()
        return out
    except Exception as exc:
        _flops_note(f"FLOPs computation failed ({type(exc).__name__}: {exc})")
        return None


# ------------------------------------------------------------------------------------------------ run
def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --preset tiny for a smoke run)")
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    K = args.k
    config = build_config(args.preset, args.attn)
    T = config.num_hidden_layers
    if not 1 <= K < T:
        raise SystemExit(f"--k must be in [1, {T - 1}] for this preset ({T} layers), got {K}")
    env = environment_info(device)
    t_start = time.perf_counter()
    model = build_model(config, device, dtype, args.seed)
    synchronize(device)
    n_params = sum(p.numel() for p in model.parameters())
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    print(f"model: {args.preset} LlamaForCausalLM, {n_params / 1e9:.2f}B params ({weights_gib:.2f} GiB {args.dtype}), "
          f"attn={config._attn_implementation}, device={device}, built in {time.perf_counter() - t_start:.1f}s",
          file=sys.stderr, flush=True)
    bench = Bench(model, args, device)

    steps_per_shape = 3 + len(args.ratios) * (3 + 3 + (0 if args.no_interp else 1))
    prog = Progress(len(args.images) * steps_per_shape)
    gen = torch.Generator().manual_seed(args.seed)
    shapes = []
    try:
        with torch.inference_mode():
            for n_img in args.images:
                N = n_img * args.tokens_per_image
                L = args.prefix + N + args.text
                if L + args.decode_tokens > config.max_position_embeddings:
                    prog.log(f"warning: prompt of {L} tokens (+{args.decode_tokens} decoded) exceeds "
                             f"max_position_embeddings={config.max_position_embeddings}")
                ids = torch.randint(3, config.vocab_size, (args.batch, L), generator=gen).to(device)
                tag = f"{n_img}x{args.tokens_per_image}"
                shape = {"images": n_img, "tokens_per_image": args.tokens_per_image, "num_visual": N,
                         "prefix": args.prefix, "text": args.text, "L": L, "batch": args.batch}

                prog.start(f"{tag}: vanilla TTFT (L={L})")
                t_van = bench.ttft(ids)
                prog.advance()
                out = bench.prefill(ids)
                shape["logits_finite"] = bool(torch.isfinite(out.logits.float()).all())
                del out
                prog.start(f"{tag}: vanilla peak memory")
                mem_van = bench.memory(ids)
                prog.advance()
                prog.start(f"{tag}: vanilla decode")
                dec_van = bench.decode(ids)
                prog.advance()
                shape["vanilla"] = {"ttft": t_van.as_dict(), "memory": mem_van.as_dict() if mem_van else None,
                                    "decode": dec_van}

                runs = []
                for R in args.ratios:
                    keep = keep_count(N, R)
                    lp = L - (N - keep)
                    run_ = {"ratio": R, "k": K, "keep": keep, "Lp": lp}
                    h = me.apply(model, "fastv", k=K, ratio=R, image_token_start_index=args.prefix,
                                 image_token_length=N)
                    try:
                        prog.start(f"{tag}: FastV K={K} R={R} TTFT (L'={lp})")
                        t_fv = bench.ttft(ids)
                        prog.advance()
                        st = h.stats
                        run_["stats"] = {"keep_count": list(st.keep_count), "pruned_length": list(st.pruned_length),
                                         "cache_lengths_after_prefill": st.cache_lengths,
                                         "scoring_layer": st.scoring_layer}
                        prog.start(f"{tag}: FastV R={R} peak memory")
                        mem_fv = bench.memory(ids)
                        prog.advance()
                        prog.start(f"{tag}: FastV R={R} decode (pruned cache)")
                        dec_fv = bench.decode(ids)
                        prog.advance()
                    finally:
                        h.remove()
                    if list(st.pruned_length) and st.pruned_length[0] != lp:
                        prog.log(f"warning: FastV pruned length {st.pruned_length} != expected L'={lp}")
                    t_lp = None
                    if not args.no_interp:
                        prog.start(f"{tag}: vanilla TTFT at L'={lp} (interpolated ideal)")
                        t_lp = bench.ttft(ids[:, :lp])
                        prog.advance()
                    prog.start(f"{tag}: ideal shape R={R}: layers[:{K}]@{L} + layers[{K}:]@{lp} - shell@{lp}")
                    ideal = bench.ideal(ids, K, lp, t_van, t_lp)
                    for _ in range(3):  # three timings: two segments and the shell
                        prog.advance()
                    fl = flops_report(config, args.prefix, N, args.text, K, R)
                    run_.update(ttft=t_fv.as_dict(), memory=mem_fv.as_dict() if mem_fv else None, decode=dec_fv,
                                ideal=ideal, flops=fl,
                                speedup=t_van.median_ms / t_fv.median_ms,
                                ideal_speedup=t_van.median_ms / ideal["direct_ms"],
                                overhead=t_fv.median_ms / ideal["direct_ms"] - 1.0,
                                overhead_vs_interp=(t_fv.median_ms / ideal["interp_ms"] - 1.0)
                                if ideal["interp_ms"] else None)
                    runs.append(run_)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                shape["fastv"] = runs
                shapes.append(shape)
    finally:
        prog.close()

    result = {"benchmark": "fastv", "env": env, "args": vars(args),
              "model": {"preset": args.preset, "class": type(model).__name__, "params": n_params,
                        "weights_gib": weights_gib, "num_layers": T, "hidden": config.hidden_size,
                        "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
                        "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size,
                        "attn_implementation": args.attn, "dtype": args.dtype},
              "shapes": shapes, "acceptance": acceptance(shapes), "elapsed_s": time.perf_counter() - t_start}
    return result


def acceptance(shapes: list[dict]) -> dict | None:
    for s in shapes:
        if s["images"] != ACCEPT_IMAGES or s["tokens_per_image"] != 576:
            continue
        for r in s["fastv"]:
            if abs(r["ratio"] - ACCEPT_RATIO) < 1e-9:
                fl = r["flops"] or {}
                return {"images": ACCEPT_IMAGES, "ratio": ACCEPT_RATIO, "L": s["L"], "Lp": r["Lp"],
                        "fastv_ms": r["ttft"]["median_ms"], "ideal_ms": r["ideal"]["direct_ms"],
                        "ideal_interp_ms": r["ideal"]["interp_ms"], "overhead": r["overhead"],
                        "threshold": ACCEPT_OVERHEAD, "passed": r["overhead"] < ACCEPT_OVERHEAD,
                        "speedup": r["speedup"], "ideal_speedup": r["ideal_speedup"],
                        "flops_speedup_eq5": 1 / fl["paper_eq5_ratio"] if fl.get("paper_eq5_ratio") else None,
                        "flops_speedup_exact": 1 / fl["exact_ratio"] if fl.get("exact_ratio") else None}
    return None


# ------------------------------------------------------------------------------------------------ report
def _mem_cell(m: dict | None) -> str:
    if not m:
        return "n/a"
    return f"{m['peak_gib']:.2f} (+{m['extra_gib']:.2f})"


def _tps_cell(d: dict | None) -> str:
    return "n/a" if not d else f"{d['tokens_per_s']:.1f}"


def _t_cell(t: dict) -> str:
    return f"{t['median_ms']:.1f} [{t['p10_ms']:.1f}–{t['p90_ms']:.1f}]"


COLUMNS = [("method", "method"), ("R", "R"), ("kept", "kept visual tokens"), ("Lp", "seq len L'"),
           ("ttft", "TTFT ms median [p10–p90]"), ("speedup", "speedup"),
           ("ideal", "ideal-shape TTFT ms (direct / interp.)"), ("ideal_speedup", "ideal speedup"),
           ("overhead", "overhead vs ideal"), ("flops", "FLOPs ratio Eq.5 / exact (= ideal ×)"),
           ("mem", "peak mem GiB (+ over weights)"), ("decode", "decode tok/s")]


def shape_rows(s: dict) -> list[dict]:
    v = s["vanilla"]
    rows = [{"method": "vanilla", "R": "–", "kept": f"{s['num_visual']}", "Lp": s["L"], "ttft": _t_cell(v["ttft"]),
             "speedup": "1.00×", "ideal": "–", "ideal_speedup": "–", "overhead": "–", "flops": "1.000 / 1.000",
             "mem": _mem_cell(v["memory"]), "decode": _tps_cell(v["decode"])}]
    for r in s["fastv"]:
        ideal = r["ideal"]
        interp = f"{ideal['interp_ms']:.1f}" if ideal["interp_ms"] is not None else "n/a"
        fl = r["flops"]
        if fl:
            flops = (f"{fl['paper_eq5_ratio']:.3f} / {fl['exact_ratio']:.3f} "
                     f"({1 / fl['paper_eq5_ratio']:.2f}× / {1 / fl['exact_ratio']:.2f}×)")
        else:
            flops = "n/a"
        rows.append({"method": f"FastV K={r['k']}", "R": f"{r['ratio']:g}", "kept": f"{r['keep']}", "Lp": r["Lp"],
                     "ttft": _t_cell(r["ttft"]), "speedup": f"{r['speedup']:.2f}×",
                     "ideal": f"{ideal['direct_ms']:.1f} / {interp}", "ideal_speedup": f"{r['ideal_speedup']:.2f}×",
                     "overhead": f"{100 * r['overhead']:+.1f}%", "flops": flops, "mem": _mem_cell(r["memory"]),
                     "decode": _tps_cell(r["decode"])})
    return rows


def command_line() -> str:
    parts = [a if (a and all(c.isalnum() or c in "-_./=:" for c in a)) else repr(a) for a in sys.argv[1:]]
    return "PYTHONPATH=src python3 benchmarks/fastv/bench_fastv.py " + " ".join(parts)


def render_markdown(result: dict) -> str:
    env, m, a = result["env"], result["model"], result["args"]
    clock = "CUDA events" if env.get("gpu") else "host clock"
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_threads')} threads)"
    lines = [f"## FastV latency: {m['preset']} ({m['params'] / 1e9:.2f}B params, random weights), {m['dtype']}, "
             f"attn={m['attn_implementation']}, batch {a['batch']}",
             "",
             f"- device: {dev}; torch {env['torch']} (CUDA {env.get('torch_cuda')}), transformers "
             f"{env.get('transformers')}, python {env['python']}; {env['time_utc']}",
             f"- command: `{command_line()}`",
             f"- TTFT = LLM prefill `model(ids, use_cache=True, logits_to_keep=1)` (no vision tower); "
             f"{a['warmup']} warm-up + ≥{a['repeats']} timed calls (≥{a['min_time']:g} s per measurement, {clock}); decode = {a['decode_tokens']} "
             f"greedy steps on the prefill's cache (median of {a['decode_repeats']} loops)",
             "- ideal shape = unmodified model, layers[:K] at L + layers[K:] at L' − one embeddings/norm/head shell "
             "at L' (direct); interp. = K/T·t(L) + (T−K)/T·t(L'); overhead = FastV TTFT / ideal(direct) − 1",
             "- FLOPs ratio = pruned / baseline (paper Eq. 5, text after the image ignored / exact prefill incl. "
             "all text, SwiGLU, causal attention, LM head); in brackets the speedup it predicts",
             ""]
    for s in result["shapes"]:
        lines.append(f"### {s['images']} image(s) × {s['tokens_per_image']} = {s['num_visual']} visual tokens, "
                     f"L = {s['prefix']} + {s['num_visual']} + {s['text']} = {s['L']}")
        lines.append("")
        lines.append(markdown_table(shape_rows(s), COLUMNS))
        lines.append("")
    acc = result.get("acceptance")
    if acc:
        fe = acc.get("flops_speedup_eq5")
        fx = acc.get("flops_speedup_exact")
        flops_txt = f"{fe:.2f}× (Eq.5) / {fx:.2f}× (exact)" if fe and fx else "n/a"
        lines.append(f"**Acceptance** ({acc['images']}×576, R={acc['ratio']}): FastV {acc['fastv_ms']:.1f} ms vs ideal "
                     f"pruned shape {acc['ideal_ms']:.1f} ms → overhead {100 * acc['overhead']:+.1f}% "
                     f"(< {100 * acc['threshold']:.0f}%: **{'PASS' if acc['passed'] else 'FAIL'}**); measured "
                     f"speedup {acc['speedup']:.2f}×, ideal {acc['ideal_speedup']:.2f}×, FLOPs ratio says {flops_txt}.")
    else:
        lines.append("Acceptance: not evaluated (needs --images 8 with 576 tokens per image and R=0.75).")
    lines.append("")
    lines.append(f"Total benchmark time: {result['elapsed_s']:.1f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    md = render_markdown(result)
    print(md)
    write_outputs(result, md, args.out, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
