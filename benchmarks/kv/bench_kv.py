#!/usr/bin/env python3
"""KV-compression speed benchmark: prefill time, peak memory, stored KV bytes and decode tokens/s against the
decode bandwidth roofline, for several contexts and ratios, all in one run.

A 7B-size model with random weights (latency does not depend on weight values), bf16, SDPA. For every preset,
context length L and arm the script measures, on random token ids:
  prefill   `model(ids, use_cache=True, logits_to_keep=1)` (CUDA events), its peak memory; with a method attached
            each layer's cache is compressed right after its attention call (docs/kv_methods.md, "How it works")
  KV        stored bytes after prefill (keys + values over all layers) and the reduction vs the full cache
  decode    a greedy loop of single-token steps with explicit position_ids L, L+1, ... on that cache (handle
            attached), timed with CUDA events over the whole loop after a few warm-up steps; the timed loops run
            back to back on one prefill's cache (median loop reported); plus the host time to enqueue a loop
            (≈ the loop's GPU time when the loop is host/launch-bound) and the peak memory while decoding
  roofline  bytes read per step = weight bytes read (all parameters except the input embedding table) + stored
            KV bytes at the middle of the loop, divided by a device bandwidth measured once (large copy and
            large read-only reduction; the larger is used). A second bound adds what HF's DynamicCache moves on
            top: every step appends by torch.cat, reading and writing the whole cache (W + 3 x KV).
  breakdown standalone per-step costs at the stored lengths, summed over layers: the torch.cat append of keys
            and values, and the SDPA decode kernel (1 query); plus a full-cache decode at a short context
            (--floor-context) = the weights + launch floor of the plain HF decode step
Arms: ratio 0 = the unmodified model with NO method attached (the baseline); every other (method, ratio) pair
uses `mllm_efficiency.apply(model, method, ratio=r)`.

GPU (H100, about 6.5 minutes; results and reading in benchmarks/kv/SPEED.md):
  PYTHONPATH=src python3 benchmarks/kv/bench_kv.py --preset llama-2-7b qwen2-7b --device cuda --dtype bf16 \
      --contexts 8192 32768 --methods snapkv --ratios 0 0.5 0.9 --decode-tokens 64 --repeats 2 --max-seconds 400 \
      --out benchmarks/kv/results_speed.json --markdown benchmarks/kv/results_speed.md
CPU smoke (seconds):
  python benchmarks/kv/bench_kv.py --preset tiny --device cpu --dtype fp32 --contexts 256 512 --decode-tokens 8 \
      --repeats 1 --out /tmp/kv.json --markdown /tmp/kv.md
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
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
from mllm_efficiency.bench.timing import GIB, environment_info, markdown_table, synchronize, time_cuda
from mllm_efficiency.bench.models import build_random_model  # noqa: E402
from mllm_efficiency.bench.report import jsonable  # noqa: E402
from mllm_efficiency.core.attachments import cache_kwarg, output_cache  # noqa: E402
from mllm_efficiency.bench import roofline  # noqa: E402
from mllm_efficiency.bench.roofline import kv_bytes, stored_lengths  # noqa: E402

# ------------------------------------------------------------------------------------------------ presets
_COMMON = dict(rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False, initializer_range=0.02)
PRESETS = {
    # Llama-2-7B (= Vicuna-7B / LLaVA-1.5-7B language model): MHA, 512 KiB of KV per token (16 GiB at 32k)
    "llama-2-7b": dict(arch="llama", config=dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=65536, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, **_COMMON)),
    # Qwen2-7B (= LLaVA-OneVision-7B / Qwen2-VL-7B language model): GQA with 4 KV heads, 56 KiB per token
    "qwen2-7b": dict(arch="qwen2", config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=65536, rope_theta=1000000.0, use_sliding_window=False,
        bos_token_id=151643, eos_token_id=151643, pad_token_id=151643, **dict(_COMMON, rms_norm_eps=1e-6))),
    # CPU smoke runs
    "tiny": dict(arch="llama", config=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=4096, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, **_COMMON)),
    "tiny-qwen2": dict(arch="qwen2", config=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1000000.0, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **_COMMON)),
}
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
ACCEPT_CONTEXT, ACCEPT_RATIO, ACCEPT_SPEEDUP, ACCEPT_REDUCTION = 32768, 0.9, 2.0, 0.85


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"ratio = fraction of the prompt KV removed, must be in [0, 1), got {v}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["llama-2-7b"],
                   help="model shape(s), run one after the other in this order (add qwen2-7b for the GQA contrast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation of the model (same in every arm)")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768], help="prompt lengths L in tokens")
    p.add_argument("--methods", nargs="+", default=["snapkv"], help="registered KV methods (e.g. snapkv streamingllm)")
    p.add_argument("--ratios", type=_ratio, nargs="+", default=[0.0, 0.5, 0.9],
                   help="fraction of the prompt KV removed; 0 = full cache, no method attached (always run)")
    p.add_argument("--method-kwargs", default="{}", help='JSON of extra config per method, e.g. \'{"snapkv": {"window": 64}}\'')
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed prefill calls per arm (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed prefill calls per arm")
    p.add_argument("--decode-tokens", type=int, default=64, help="single-token steps per timed decode loop")
    p.add_argument("--decode-warmup", type=int, default=8, help="untimed decode steps before the timed loops")
    p.add_argument("--decode-repeats", type=int, default=3, help="timed decode loops (back to back, median reported)")
    p.add_argument("--floor-context", type=int, default=128,
                   help="also time a full-cache decode at this short context: the weights + launch floor (0: skip)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the standalone cat / SDPA per-step timings")
    p.add_argument("--diag-steps", type=int, default=4,
                   help="after the timed loops, profile this many more steps per arm: GPU kernel time per step "
                        "(torch.profiler), synchronising CUDA calls per step, and the host's hottest Python "
                        "functions (cProfile); 0: skip")
    p.add_argument("--bw-mib", type=int, default=None, help="buffer for the bandwidth measurement (default 4096 "
                   "on cuda, 256 on cpu)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new arm after this many seconds (the rest is marked skipped; results so far are "
                        "written)")
    p.add_argument("--no-cudnn-sdp", action="store_true",
                   help="disable PyTorch's cuDNN SDPA backend (torch.backends.cuda.enable_cudnn_sdp(False)) in every "
                        "arm; torch >= 2.10 with cuDNN > 9.15 prefers it on sm90, and it rebuilds a cuDNN graph for "
                        "every new KV length, i.e. at every decode step (see SPEED.md)")
    p.add_argument("--cpu-threads", type=int, default=1, help="torch threads with --device cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the raw results as JSON here (default: not written)")
    p.add_argument("--markdown", default=None, help="write the markdown tables here (default: stdout only)")
    args = p.parse_args(argv)
    try:
        args.method_kwargs = json.loads(args.method_kwargs)
        assert isinstance(args.method_kwargs, dict)
    except Exception:
        p.error("--method-kwargs must be a JSON object {method: {key: value}}")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.decode_repeats < 1 or args.decode_tokens < 1:
        p.error("need --repeats >= 1, --warmup >= 0, --batch >= 1, --decode-repeats >= 1, --decode-tokens >= 1")
    if min(args.contexts) < 2:
        p.error("--contexts must be >= 2 tokens")
    unknown = [m for m in args.methods if m not in me.available_methods()]
    if unknown:
        p.error(f"unknown method(s) {unknown}; registered: {me.available_methods()}")
    args.ratios = sorted(set(args.ratios) | {0.0})
    if args.bw_mib is None:
        args.bw_mib = 4096 if torch.device(args.device).type == "cuda" else 256
    return args


def log(msg: str, t0: float | None = None) -> None:
    prefix = f"[{time.perf_counter() - t0:7.1f}s] " if t0 is not None else ""
    print(prefix + msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ model
def build_config(preset: str, attn: str):
    spec = PRESETS[preset]
    if spec["arch"] == "llama":
        from transformers import LlamaConfig as Cfg
    else:
        from transformers import Qwen2Config as Cfg
    cfg = dict(spec["config"])
    params = getattr(Cfg, "__dataclass_fields__", None) or inspect.signature(Cfg).parameters
    theta = cfg.pop("rope_theta")
    if "rope_parameters" in params:  # transformers 5.x
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:  # 4.x
        cfg["rope_theta"] = theta
    return Cfg(**cfg, attn_implementation=attn)


def build_model(preset: str, config, device: torch.device, dtype: torch.dtype, seed: int):
    """Random-init causal LM built directly on `device` in `dtype`."""
    if PRESETS[preset]["arch"] == "llama":
        from transformers import LlamaForCausalLM as Model
    else:
        from transformers import Qwen2ForCausalLM as Model
    return build_random_model(Model, config, device, dtype, seed)


def weight_bytes_read(model) -> int:
    """Parameter bytes a decode step reads: everything but the input embedding table (one row is read);
    with tied embeddings the table is the LM head and is read in full."""
    emb = model.get_input_embeddings().weight
    tied = any(p is emb for n, p in model.named_parameters() if "lm_head" in n) or \
        getattr(model.config, "tie_word_embeddings", False)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not tied:
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return int(total)


# ------------------------------------------------------------------------------------------------ timing
class Clock:
    """CUDA events on cuda, perf_counter on cpu; also the host time spent enqueueing (before the final sync)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def run(self, fn) -> tuple[float, float]:
        """(device ms, host enqueue ms) of fn()."""
        synchronize(self.device)
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            t_enq = time.perf_counter() - t0
            end.record()
            end.synchronize()
            return start.elapsed_time(end), t_enq * 1e3
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms


def measure_bandwidth(device: torch.device, mib: int, repeats: int = 10) -> dict:
    """Achieved memory bandwidth (bench.roofline: device copy and read-only sum, the larger is used) and the
    host cost of one tiny op, under this script's result keys."""
    bw = roofline.measure_bandwidth(device, mib, repeats)
    return {"launch_us": roofline.host_launch_us(device), "buffer_bytes": bw["buffer_bytes"],
            "copy_ms": bw["copy_ms"], "read_ms": bw["read_ms"], "copy_bytes_per_s": bw["copy_bytes_per_s"],
            "read_bytes_per_s": bw["read_bytes_per_s"], "used_bytes_per_s": bw["bytes_per_s"]}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def read_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# ------------------------------------------------------------------------------------------------ one arm
class Runner:
    def __init__(self, model, args, device: torch.device, bandwidth: float, t0: float):
        self.model, self.args, self.device, self.bw, self.t0 = model, args, device, bandwidth, t0
        self.ck = cache_kwarg(model)
        self.clock = Clock(device)
        self.w_read = weight_bytes_read(model)

    def prefill(self, ids):
        return self.model(ids, use_cache=True, logits_to_keep=1)

    def step(self, tok, pos, cache):
        out = self.model(tok, position_ids=pos, use_cache=True, logits_to_keep=1, **{self.ck: cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def arm(self, ids, method: str | None, ratio: float) -> dict:
        a, dev = self.args, self.device
        B, L = ids.shape
        res: dict = {"method": method or "none", "ratio": ratio, "L": L, "batch": B}
        handle = None
        if method is not None:
            handle = me.apply(self.model, method, ratio=ratio, **a.method_kwargs.get(method, {}))
            res["config"] = repr(handle.config)
        cache = tok = None
        try:
            # prefill time
            t_pre = time_cuda(lambda: self.prefill(ids), warmup=a.warmup, repeats=a.repeats, device=dev)
            res["prefill"] = t_pre.as_dict()
            free_memory(dev)
            # the prefill whose cache is decoded, with its peak memory
            base = reset_peak(dev)
            out = self.prefill(ids)
            peak = read_peak(dev)
            cache = output_cache(out, required=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            res["logits_finite"] = bool(torch.isfinite(out.logits.float()).all())
            del out
            res["prefill_memory"] = None if peak is None else {
                "peak_bytes": peak, "baseline_bytes": base, "extra_bytes": peak - base}
            kvb = kv_bytes(cache)
            lengths = stored_lengths(cache)
            res["kv_bytes"] = kvb
            res["stored_lengths"] = lengths
            res["stored_tokens_mean"] = statistics.fmean(lengths) if lengths else 0
            res["cache_type"] = type(cache).__name__
            if handle is not None:
                st = handle.stats
                res["stats"] = {"kept_fraction": st.kept_fraction, "bytes_before": st.bytes_before,
                                "bytes_after": st.bytes_after, "scoring_time_s": st.scoring_time_s,
                                "stored": list(st.stored), "prefills": st.prefills}
            # decode: warm-up steps, then timed loops back to back on this cache
            pos = L
            n = a.decode_tokens
            total_steps = a.decode_warmup + n * a.decode_repeats + 2 * max(a.diag_steps, 0)
            positions = torch.arange(L, L + total_steps, device=dev).view(1, -1)
            positions = positions.expand(B, -1)
            state = {"tok": tok, "pos": 0}

            def run_steps(k):
                t, j = state["tok"], state["pos"]
                for s in range(j, j + k):
                    t = self.step(t, positions[:, s:s + 1], cache)
                state["tok"], state["pos"] = t, j + k

            if a.decode_warmup:
                run_steps(a.decode_warmup)
            dec_base = reset_peak(dev)
            loops = []
            for _ in range(a.decode_repeats):
                kv_before = kv_bytes(cache)
                start_pos = pos + state["pos"]
                ms, enq = self.clock.run(lambda: run_steps(n))
                kv_after = kv_bytes(cache)
                kv_mid = (kv_before + kv_after) / 2
                loops.append({"ms": ms, "host_enqueue_ms": enq, "ms_per_step": ms / n,
                              "host_enqueue_ms_per_step": enq / n, "first_position": start_pos,
                              "kv_bytes_mid": kv_mid})
            dec_peak = read_peak(dev)
            med = sorted(loops, key=lambda x: x["ms"])[len(loops) // 2]
            step_ms = med["ms_per_step"]
            kv_mid = med["kv_bytes_mid"]
            roof_ms = (self.w_read + kv_mid) / self.bw * 1e3
            roof_cat_ms = (self.w_read + 3 * kv_mid) / self.bw * 1e3
            diag = diagnose(run_steps, a.diag_steps, dev) if a.diag_steps > 0 else None
            res["decode"] = {
                "tokens_per_loop": n, "warmup_steps": a.decode_warmup, "loops": loops,
                "ms_per_step": step_ms, "tokens_per_s": B * 1e3 / step_ms,
                "host_enqueue_ms_per_step": med["host_enqueue_ms_per_step"],
                "kv_bytes_mid": kv_mid, "stored_lengths_after": stored_lengths(cache),
                "peak_bytes": dec_peak, "baseline_bytes": dec_base,
                "roofline_ms": roof_ms, "roofline_tokens_per_s": B * 1e3 / roof_ms,
                "measured_over_roofline": step_ms / roof_ms,
                "roofline_with_cat_ms": roof_cat_ms, "measured_over_roofline_with_cat": step_ms / roof_cat_ms,
                "diagnostics": diag,
            }
        finally:
            if handle is not None:
                handle.remove()
            del cache, tok
            free_memory(dev)
        return res


# ------------------------------------------------------------------------------------------------ diagnostics
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def diagnose(run_steps, steps: int, device: torch.device) -> dict:
    """Where a decode step's time goes: GPU kernel time per step from torch.profiler (independent of how fast
    the host issues work), host API calls that block (synchronisations, blocking copies) per step, and the
    hottest host functions (cProfile, by own time) over `steps` more decode steps."""
    import cProfile
    import pstats

    out: dict = {"steps": steps}
    try:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        synchronize(device)
        with profile(activities=acts) as prof:
            run_steps(steps)
            synchronize(device)
        kernel_us, n_kernels, calls = 0.0, 0, {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernel_us += e.time_range.elapsed_us()
                n_kernels += 1
            elif any(e.name.startswith(c) for c in SYNC_CALLS):
                calls[e.name] = calls.get(e.name, 0) + 1
        out.update(kernel_ms_per_step=kernel_us / 1e3 / steps if device.type == "cuda" else None,
                   kernels_per_step=n_kernels / steps, sync_calls_per_step={k: v / steps for k, v in calls.items()})
    except Exception as exc:  # profiler unavailable: keep the run going
        out["profiler_error"] = f"{type(exc).__name__}: {exc}"
    try:
        synchronize(device)
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        run_steps(steps)
        pr.disable()
        synchronize(device)
        out["cprofile_ms_per_step"] = (time.perf_counter() - t0) * 1e3 / steps
        st = pstats.Stats(pr)
        rows = []
        for (fname, line, func), (cc, nc, tt, ct, _) in st.stats.items():
            rows.append({"function": f"{Path(fname).name}:{line}({func})", "calls_per_step": nc / steps,
                         "own_ms_per_step": tt * 1e3 / steps, "cum_ms_per_step": ct * 1e3 / steps})
        rows.sort(key=lambda r: -r["own_ms_per_step"])
        out["host_top_own"] = rows[:12]
        out["host_top_cum"] = sorted(rows, key=lambda r: -r["cum_ms_per_step"])[:25]
    except Exception as exc:
        out["cprofile_error"] = f"{type(exc).__name__}: {exc}"
    return out


def sdp_info() -> dict:
    """Which SDPA backends PyTorch may pick (and in which order, where torch exposes it)."""
    b = torch.backends.cuda
    info = {}
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled", "cudnn_sdp_enabled"):
        fn = getattr(b, name, None)
        if fn is not None:
            info[name] = bool(fn())
    order = getattr(torch._C, "_get_sdp_priority_order", None)
    if order is not None:
        try:
            info["priority_order"] = [str(x) for x in order()]
        except Exception:
            pass
    return info


def host_info() -> dict:
    import os
    import platform

    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


# ------------------------------------------------------------------------------------------------ breakdown
def per_step_costs(config, device, dtype, batch: int, stored: int, repeats: int = 5) -> dict:
    """Standalone per-step costs at `stored` cached tokens, summed over all layers: HF DynamicCache's append
    (torch.cat of keys and of values with one new token) and the SDPA decode kernel (one query)."""
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    D = getattr(config, "head_dim", None) or config.hidden_size // H
    T = config.num_hidden_layers
    k = torch.randn(batch, Hkv, stored, D, device=device, dtype=dtype)
    v = torch.randn_like(k)
    new = torch.randn(batch, Hkv, 1, D, device=device, dtype=dtype)
    q = torch.randn(batch, H, 1, D, device=device, dtype=dtype)
    t_cat = time_cuda(lambda: torch.cat([k, new], dim=-2), warmup=2, repeats=repeats, device=device)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kw = {"enable_gqa": True} if Hkv != H else {}
    t_att = time_cuda(lambda: sdpa(q, k, v, **kw), warmup=2, repeats=repeats, device=device)
    del k, v, new, q
    free_memory(device)
    return {"stored": stored, "cat_ms": 2 * T * t_cat.median_ms, "sdpa_ms": T * t_att.median_ms,
            "cat_one_tensor_ms": t_cat.median_ms, "sdpa_one_layer_ms": t_att.median_ms}


# ------------------------------------------------------------------------------------------------ run
def run_preset(preset: str, args, device, dtype, bandwidth: dict, t0: float, result: dict, save) -> dict:
    config = build_config(preset, args.attn)
    tb = time.perf_counter()
    model = build_model(preset, config, device, dtype, args.seed)
    synchronize(device)
    n_params = sum(p.numel() for p in model.parameters())
    w_all = sum(p.numel() * p.element_size() for p in model.parameters())
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    D = getattr(config, "head_dim", None) or config.hidden_size // H
    kv_per_token = 2 * config.num_hidden_layers * Hkv * D * torch.tensor([], dtype=dtype).element_size()
    log(f"model {preset}: {type(model).__name__}, {n_params / 1e9:.2f}B params ({w_all / GIB:.2f} GiB), "
        f"{Hkv}/{H} KV/Q heads, {kv_per_token / 1024:.0f} KiB KV per token, built in "
        f"{time.perf_counter() - tb:.1f}s", t0)
    runner = Runner(model, args, device, bandwidth["used_bytes_per_s"], t0)
    pres = {"preset": preset, "arch": type(model).__name__, "params": n_params, "weight_bytes": w_all,
            "weight_bytes_read_per_step": runner.w_read, "kv_bytes_per_token": kv_per_token,
            "layers": config.num_hidden_layers, "heads": H, "kv_heads": Hkv, "head_dim": D,
            "attn_implementation": args.attn, "contexts": [], "floor": None}
    result["presets"].append(pres)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        if args.floor_context:
            ids = torch.randint(3, config.vocab_size, (args.batch, args.floor_context), generator=gen).to(device)
            log(f"{preset}: floor: full cache, L={args.floor_context}", t0)
            pres["floor"] = runner.arm(ids, None, 0.0)
            save()
        for L in args.contexts:
            ids = torch.randint(3, config.vocab_size, (args.batch, L), generator=gen).to(device)
            ctx = {"L": L, "arms": [], "breakdown": []}
            pres["contexts"].append(ctx)
            arms = [(None, 0.0)] + [(m, r) for m in args.methods for r in args.ratios if r > 0]
            for method, ratio in arms:
                if out_of_time(args, t0):
                    ctx.setdefault("skipped", []).append(f"{method or 'none'} {ratio:g}")
                    log(f"{preset}: L={L} {method or 'none'} ratio={ratio:g}: skipped (--max-seconds)", t0)
                    continue
                log(f"{preset}: L={L} {method or 'none (full cache)'} ratio={ratio:g}", t0)
                arm = runner.arm(ids, method, ratio)
                ctx["arms"].append(arm)
                base = ctx["arms"][0]
                if base["method"] == "none":
                    arm["decode_speedup"] = arm["decode"]["tokens_per_s"] / base["decode"]["tokens_per_s"]
                    arm["prefill_ratio"] = arm["prefill"]["median_ms"] / base["prefill"]["median_ms"]
                    arm["kv_reduction"] = 1.0 - arm["kv_bytes"] / base["kv_bytes"]
                d = arm["decode"]
                log(f"    prefill {arm['prefill']['median_ms']:.1f} ms, KV {_kv(arm['kv_bytes'])}, decode "
                    f"{d['tokens_per_s']:.1f} tok/s ({d['ms_per_step']:.2f} ms/step, host enqueue "
                    f"{d['host_enqueue_ms_per_step']:.2f}), roofline {d['roofline_ms']:.2f} ms"
                    + (f", speedup {arm['decode_speedup']:.2f}x" if "decode_speedup" in arm else ""), t0)
                save()
            if not args.no_breakdown and not out_of_time(args, t0):
                seen = set()
                for arm in ctx["arms"]:
                    s = int(round(arm["decode"]["kv_bytes_mid"] / kv_per_token / args.batch))
                    if s in seen:
                        continue
                    seen.add(s)
                    b = per_step_costs(config, device, dtype, args.batch, s)
                    b["arm"] = f"{arm['method']} {arm['ratio']:g}"
                    b["weights_over_bw_ms"] = runner.w_read / bandwidth["used_bytes_per_s"] * 1e3
                    b["kv_over_bw_ms"] = s * kv_per_token * args.batch / bandwidth["used_bytes_per_s"] * 1e3
                    ctx["breakdown"].append(b)
            save()
    del runner, model
    free_memory(device)
    return pres


def out_of_time(args, t0: float) -> bool:
    return args.max_seconds is not None and time.perf_counter() - t0 > args.max_seconds


def acceptance(result: dict) -> list[dict]:
    out = []
    for pres in result["presets"]:
        for ctx in pres["contexts"]:
            if ctx["L"] != ACCEPT_CONTEXT:
                continue
            for arm in ctx["arms"]:
                if arm["method"] == "none" or abs(arm["ratio"] - ACCEPT_RATIO) > 1e-9 or "decode_speedup" not in arm:
                    continue
                ok = arm["decode_speedup"] >= ACCEPT_SPEEDUP and arm["kv_reduction"] >= ACCEPT_REDUCTION
                out.append({"preset": pres["preset"], "method": arm["method"], "L": ctx["L"], "ratio": arm["ratio"],
                            "decode_speedup": arm["decode_speedup"], "kv_reduction": arm["kv_reduction"],
                            "speedup_threshold": ACCEPT_SPEEDUP, "reduction_threshold": ACCEPT_REDUCTION,
                            "passed": ok})
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --preset tiny for a smoke run)")
    if device.type == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    if args.no_cudnn_sdp and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    env = environment_info(device)
    env["host"] = host_info()
    env["sdp"] = sdp_info()
    result = {"env": env, "command": command_line(), "args": {k: v for k, v in vars(args).items()},
              "dtype": args.dtype, "presets": [], "acceptance": None}

    def save():
        result["elapsed_s"] = time.perf_counter() - t0
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(jsonable(result), indent=1))

    log(f"device {env.get('gpu') or 'cpu'}; torch {env['torch']}, transformers {env.get('transformers')}", t0)
    result["bandwidth"] = measure_bandwidth(device, args.bw_mib)
    bw = result["bandwidth"]
    log(f"bandwidth: copy {bw['copy_bytes_per_s'] / 1e12:.3f} TB/s, read {bw['read_bytes_per_s'] / 1e12:.3f} TB/s; "
        f"host cost of one tiny op {bw['launch_us']:.1f} us; host {env['host']}", t0)
    try:
        for preset in args.preset:
            if out_of_time(args, t0):
                result.setdefault("skipped_presets", []).append(preset)
                continue
            run_preset(preset, args, device, dtype, bw, t0, result, save)
    except BaseException as exc:  # keep what was measured: JSON and markdown of the finished arms
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result["acceptance"] = acceptance(result)
        result["elapsed_s"] = time.perf_counter() - t0
        save()
        if args.markdown:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown).write_text(render_markdown(result))
    return result


# ------------------------------------------------------------------------------------------------ report
def command_line() -> str:
    parts = [a if (a and all(c.isalnum() or c in "-_./=:$" for c in a)) else repr(a) for a in sys.argv[1:]]
    return "PYTHONPATH=src python3 benchmarks/kv/bench_kv.py " + " ".join(parts)


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f}"


def _kv(x) -> str:
    return f"{x / GIB:.3f} GiB" if x >= GIB / 100 else f"{x / (1 << 20):.2f} MiB"


COLUMNS = [("L", "L"), ("arm", "method"), ("ratio", "ratio"), ("stored", "stored tok/layer"),
           ("kv", "KV stored"), ("kv_red", "KV reduction"), ("prefill", "prefill ms (×full)"),
           ("pmem", "prefill peak GiB"), ("dmem", "decode peak GiB"), ("tps", "decode tok/s"),
           ("ms", "ms/step"), ("speedup", "decode speedup"), ("roof", "roofline ms (W+KV)"),
           ("eff", "measured/roofline"), ("roofcat", "roofline +cat ms (W+3KV)"), ("enq", "host enqueue ms/step")]


def arm_row(arm: dict, L) -> dict:
    d = arm["decode"]
    pm = arm.get("prefill_memory")
    ratio = "full" if arm["method"] == "none" else f"{arm['ratio']:g}"
    return {"L": L, "arm": arm["method"], "ratio": ratio, "stored": f"{arm['stored_tokens_mean']:.0f}",
            "kv": _kv(arm["kv_bytes"]),
            "kv_red": f"{100 * arm['kv_reduction']:.1f}%" if "kv_reduction" in arm else "",
            "prefill": f"{arm['prefill']['median_ms']:.1f}" + (f" ({arm['prefill_ratio']:.2f}×)" if "prefill_ratio" in arm else ""),
            "pmem": _gib(pm["peak_bytes"]) if pm else "n/a", "dmem": _gib(d["peak_bytes"]),
            "tps": f"{d['tokens_per_s']:.1f}", "ms": f"{d['ms_per_step']:.2f}",
            "speedup": f"{arm['decode_speedup']:.2f}×" if "decode_speedup" in arm else "",
            "roof": f"{d['roofline_ms']:.2f}", "eff": f"{d['measured_over_roofline']:.2f}",
            "roofcat": f"{d['roofline_with_cat_ms']:.2f}", "enq": f"{d['host_enqueue_ms_per_step']:.2f}"}


def render_markdown(result: dict) -> str:
    env, a, bw = result["env"], result["args"], result["bandwidth"]
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_threads')} threads)"
    clock = "CUDA events" if env.get("gpu") else "host clock"
    lines = [f"## KV compression speed: {', '.join(p['preset'] for p in result['presets'])} (random weights), "
             f"{result['dtype']}, attn={a['attn']}, batch {a['batch']}", "",
             f"- device: {dev}; torch {env['torch']} (CUDA {env.get('torch_cuda')}), transformers "
             f"{env.get('transformers')}, python {env['python']}; {env['time_utc']}",
             f"- command: `{result['command']}`",
             f"- host: {env.get('host', {}).get('cpu_model')}, {env.get('host', {}).get('cpu_count')} CPUs, load "
             f"average {env.get('host', {}).get('loadavg')}; SDPA backends: {env.get('sdp')}",
             f"- measured bandwidth: copy {bw['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), read-only sum "
             f"{bw['read_bytes_per_s'] / 1e12:.2f} TB/s; roofline uses {bw['used_bytes_per_s'] / 1e12:.2f} TB/s; "
             f"host cost of one tiny op (`x.add_(1)`, no sync) {bw.get('launch_us', float('nan')):.1f} µs",
             f"- prefill = `model(ids, use_cache=True, logits_to_keep=1)`, {a['warmup']} warm-up + {a['repeats']} timed "
             f"({clock}, median); decode = greedy single-token steps with explicit position_ids, {a['decode_warmup']} "
             f"warm-up steps then {a['decode_repeats']} loops × {a['decode_tokens']} steps back to back on the same "
             f"cache (median loop); 'full' = no method attached",
             "- roofline = (weight bytes read + stored KV bytes at mid-loop) / bandwidth; '+cat' adds HF "
             "DynamicCache's per-step torch.cat (reads and writes the whole cache: W + 3·KV); host enqueue = host "
             "time to issue a step (≈ ms/step when the decode is launch-bound)", ""]
    for pres in result["presets"]:
        lines.append(f"### {pres['preset']}: {pres['arch']}, {pres['params'] / 1e9:.2f}B params, "
                     f"{pres['kv_heads']}/{pres['heads']} KV/Q heads, {pres['kv_bytes_per_token'] / 1024:.0f} KiB KV "
                     f"per token, weights read per step {pres['weight_bytes_read_per_step'] / GIB:.2f} GiB")
        lines.append("")
        rows = []
        for ctx in pres["contexts"]:
            rows += [arm_row(arm, ctx["L"]) for arm in ctx["arms"]]
        lines.append(markdown_table(rows, COLUMNS))
        lines.append("")
        diag_rows = []
        arms_all = ([("floor", pres["floor"])] if pres.get("floor") else []) + \
            [(ctx["L"], arm) for ctx in pres["contexts"] for arm in ctx["arms"]]
        base_kernel = {}
        for L, arm in arms_all:
            dg = arm["decode"].get("diagnostics") or {}
            if arm["method"] == "none" and L != "floor":
                base_kernel[L] = dg.get("kernel_ms_per_step")
        for L, arm in arms_all:
            d = arm["decode"]
            dg = d.get("diagnostics") or {}
            km = dg.get("kernel_ms_per_step")
            syncs = sum((dg.get("sync_calls_per_step") or {}).values()) if "sync_calls_per_step" in dg else None
            top = dg.get("host_top_own") or []
            bk = base_kernel.get(L)
            diag_rows.append({
                "L": f"{arm['L']}" + (" (floor)" if L == "floor" else ""), "arm": arm["method"],
                "ratio": "full" if arm["method"] == "none" else f"{arm['ratio']:g}",
                "ms": f"{d['ms_per_step']:.2f}", "enq": f"{d['host_enqueue_ms_per_step']:.2f}",
                "kern": "n/a" if km is None else f"{km:.2f}",
                "ksp": f"{bk / km:.2f}×" if km and bk and L != "floor" else "",
                "nk": f"{dg['kernels_per_step']:.0f}" if "kernels_per_step" in dg else "n/a",
                "sync": "n/a" if syncs is None else f"{syncs:g}",
                "cprof": f"{dg['cprofile_ms_per_step']:.1f}" if "cprofile_ms_per_step" in dg else "n/a",
                "top": "; ".join(f"{r['function']} {r['own_ms_per_step']:.1f}" for r in top[:3])})
        if any(r["kern"] != "n/a" or r["cprof"] != "n/a" for r in diag_rows):
            lines.append("Where the decode step goes (after the timed loops, "
                         f"{a.get('diag_steps')} more steps per arm): GPU kernel time per step from torch.profiler "
                         "(what the step would cost if the host kept up), kernels and blocking CUDA calls "
                         "(synchronisations / blocking copies) per step, step time under cProfile and the three "
                         "host functions with the most own time (ms per step).")
            lines.append("")
            lines.append(markdown_table(diag_rows, [
                ("L", "L"), ("arm", "method"), ("ratio", "ratio"), ("ms", "timed ms/step"),
                ("enq", "host enqueue ms/step"), ("kern", "GPU kernel ms/step"), ("ksp", "kernel-time speedup"),
                ("nk", "kernels/step"), ("sync", "blocking calls/step"), ("cprof", "ms/step under cProfile"),
                ("top", "top host functions (own ms/step)")]))
            lines.append("")
        fl = pres.get("floor")
        if fl:
            d = fl["decode"]
            lines.append(f"Floor (full cache at L={fl['L']}): {d['ms_per_step']:.2f} ms/step "
                         f"({d['tokens_per_s']:.1f} tok/s), host enqueue {d['host_enqueue_ms_per_step']:.2f} ms/step, "
                         f"roofline {d['roofline_ms']:.2f} ms (weights only).")
            lines.append("")
        br = [dict(b, L=ctx["L"]) for ctx in pres["contexts"] for b in ctx["breakdown"]]
        if br:
            lines.append("Per-step costs of standalone kernels at the stored lengths, summed over layers (ms): "
                         "KV append by torch.cat (keys and values), SDPA decode attention, and bytes / bandwidth.")
            lines.append("")
            rows = [{"L": b["L"], "arm": b["arm"], "stored": b["stored"], "cat": f"{b['cat_ms']:.2f}",
                     "sdpa": f"{b['sdpa_ms']:.2f}", "kvbw": f"{b['kv_over_bw_ms']:.2f}",
                     "wbw": f"{b['weights_over_bw_ms']:.2f}"} for b in br]
            lines.append(markdown_table(rows, [("L", "L"), ("arm", "arm"), ("stored", "stored tokens"),
                                               ("cat", "cat ms/step"), ("sdpa", "SDPA ms/step"),
                                               ("kvbw", "KV/BW ms"), ("wbw", "W/BW ms")]))
            lines.append("")
    acc = result.get("acceptance") or []
    if acc:
        for x in acc:
            lines.append(f"**Acceptance** ({x['preset']}, {x['method']}, L={x['L']}, ratio {x['ratio']:g}): decode "
                         f"speedup {x['decode_speedup']:.2f}× (≥ {x['speedup_threshold']:g}×) and KV bytes reduced "
                         f"{100 * x['kv_reduction']:.1f}% (≥ {100 * x['reduction_threshold']:.0f}%): "
                         f"**{'PASS' if x['passed'] else 'FAIL'}**")
    else:
        lines.append(f"Acceptance: not evaluated (needs --contexts {ACCEPT_CONTEXT} and ratio {ACCEPT_RATIO}).")
    lines.append("")
    for pres in result["presets"]:
        for ctx in pres["contexts"]:
            if ctx.get("skipped"):
                lines.append(f"Skipped ({pres['preset']}, L={ctx['L']}, --max-seconds): {', '.join(ctx['skipped'])}.")
    if result.get("skipped_presets"):
        lines.append(f"Skipped presets (--max-seconds): {', '.join(result['skipped_presets'])}.")
    if result.get("error"):
        lines.append(f"**Run aborted**: {result['error']}")
    lines.append(f"Total benchmark time: {result.get('elapsed_s', 0):.1f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    md = render_markdown(result)  # also written to --markdown by run(), even when a run fails midway
    print(json.dumps(jsonable(result), indent=None))
    print()
    print(md)
    for path in (args.out, args.markdown):
        if path:
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
