"""TTFT of video token concentration methods on a LLaVA-Video-7B-size language model (random weights).

The LLM is Qwen2-7B shaped (28 layers, hidden 3584, MLP 18944, 28 heads, 4 KV heads); the vision tower is not
run: it does not depend on the method, and the measured quantity is the LLM prefill. The visual embeddings are
synthetic (frames of 14 x 14 = 196 tokens; a shared base per position plus per-frame noise, with a fraction of
static tokens, so adjacent frames are similar as in real video); they replace the embedding output for the
video span through a forward hook on `embed_tokens`, so the methods see ordinary `input_ids`.

Arms: dense, focus SEC only, focus SEC + token_dedup (the GPU fast path), framefusion cost 0.3, adaptiv, and
cmc (emulation: its time is reported but it is not a speedup method here). With `--focus-match-ff`, two more
Focus arms (SEC only, SEC + token_dedup) whose alpha_list is the default one times one factor, found by
bisection on the MAC formula below so that Focus's MACs are just at or below FrameFusion's MACs measured in the
same run (same selected layers). TTFT = one prefill forward with a cache, CUDA events, warm-up, median of
repeats. Theoretical ops (MACs) follow docs/video.md: per layer the rows each GEMM computed (the selected
layers' MLPs run on the rows their SEC step keeps; deduplicated GEMMs count their computed rows) and n^2 H for
attention; the similarity matching, gathers and scatters of token_dedup are memory-bound work, not counted.

    python benchmarks/video/bench_video.py --focus-match-ff --out results/video  # GPU, ~3 min on an H200
    python benchmarks/video/bench_video.py --tiny --focus-match-ff --out /tmp/video_tiny   # CPU smoke run
    python benchmarks/video/bench_video.py --narrow --frames 64 --arms focus_sec focus_sec_dedup --profile \
        --warmup 0 --repeats 1 --out /tmp/video_narrow   # CPU op / host-sync counts on the 7B's layer structure

`--profile` on CUDA profiles one prefill per arm (kernel time, kernels, host syncs); on CPU it counts their
proxies (aten ops that would launch a kernel, calls that would synchronise with a GPU, and where they come from).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
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
# CPU proxy of QWEN2_7B for counting ops / syncs (--narrow): its 28 layers (so its Focus layers and SEC stages),
# head size 128 and MLP ratio, 256 wide, weights scaled so that each linear layer has the 7B's gain
NARROW = dict(hidden_size=256, intermediate_size=1354, num_hidden_layers=28, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=2048, max_position_embeddings=32768, rope_theta=1e6,
              initializer_range=0.02 * (3584 / 256) ** 0.5)
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
    """MACs of the prefill's decoder layers (docs/video.md); `rows[(gemm, layer)]` = rows computed."""
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    dkv = H // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    total = 0.0
    for l, n in enumerate(tokens_per_layer):
        r = lambda g: (rows or {}).get((g, l), (n, n))[0]  # noqa: E731
        total += r("q_proj") * H * (H + 2 * dkv) + r("o_proj") * H * H + r("gate_proj") * 2 * H * I \
            + r("down_proj") * H * I + n * n * H
    return total


def focus_schedule(T: int, prompt: int, n_visual: int, selected, alphas):
    """Focus's token counts without running it (batch 1, placement mid_layer): tokens entering each layer, and
    {(gemm, layer): (rows computed, rows of the layer)} for the selected layers' MLPs."""
    text, vis = prompt - n_visual, n_visual
    stage = dict(zip(selected, alphas))
    lens, rows = [], {}
    for layer in range(T):
        lens.append(text + vis)
        if layer in stage:
            k = min(max(1, int(stage[layer] * n_visual)), vis) if vis else 0
            if k < vis:
                rows[("gate_proj", layer)] = rows[("down_proj", layer)] = (text + k, text + vis)
            vis = k
    return lens, rows


def match_alphas(cfg: dict, prompt: int, n_visual: int, selected, alphas, target: float):
    """(factor, alphas): the largest factor f (alphas = f * default, floored to 4 decimals, at most 1) whose
    theoretical MACs are <= `target`; None when even the smallest keep counts exceed it. Bisection: the MACs
    do not decrease with f."""
    T = cfg["num_hidden_layers"]

    def scaled(f):
        return tuple(min(1.0, math.floor(f * a * 1e4) / 1e4) for a in alphas)

    def macs(al):
        if min(al) <= 0:
            return math.inf
        return ops(cfg, *focus_schedule(T, prompt, n_visual, selected, al))

    lo, hi = 0.0, 1.0 / max(alphas)
    if macs(scaled(hi)) <= target:
        return hi, scaled(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(scaled(mid)) <= target else (lo, mid)
    if lo == 0.0 or macs(scaled(lo)) > target:
        return None
    return lo, scaled(lo)


FOCUS_FAST = dict(sic_mode="token_dedup", similarity_threshold=0.9, gemms=("gate_proj", "down_proj"), whole_mlp=True,
                  min_dedup_rows=4096, dedup_stages="until_dense")


def arms(T: int, frames: int):
    common = dict(frames=frames)
    video = focus_default(T)
    return [("dense", None, {}),
            ("focus_sec", "focus", dict(video, sic_mode="off", **common)),
            ("focus_sec_dedup", "focus", dict(video, sic_mode="token_dedup", similarity_threshold=0.9, **common)),
            ("framefusion_0.3", "framefusion", dict(cost=0.3, similarity_lower_bound=0.6, **common)),
            ("focus_sec_ffmatch", "focus", dict(video, sic_mode="off", **common)),  # alphas set at run time
            ("focus_sec_dedup_ffmatch", "focus", dict(video, sic_mode="token_dedup", similarity_threshold=0.9,
                                                      **common)),
            # the same with the eager (unfused) matching and group means: what the Triton kernels save
            ("focus_sec_dedup_eager_ffmatch", "focus", dict(video, sic_mode="token_dedup", similarity_threshold=0.9,
                                                            fused_kernels=False, **common)),
            # token_dedup of the MLP only, whole (`whole_mlp`): gate, up and down run once on the unique rows of
            # the MLP input; the attention projections, 8x narrower than the MLP at 7B shapes, run dense
            ("focus_sec_dedup_mlp_ffmatch", "focus", dict(video, sic_mode="token_dedup", similarity_threshold=0.9,
                                                          gemms=("gate_proj", "down_proj"), whole_mlp=True,
                                                          **common)),
            # Focus's GPU fast path: the same, matching only MLP inputs of at least 4,096 rows (the first two SEC
            # stages at 64 frames: a host sync costs more than a smaller GEMM can save) and no stage after one
            # that ran dense (each host sync after the first stage throws away the host's lead over the GPU)
            ("focus_fast_ffmatch", "focus", dict(video, **FOCUS_FAST, **common)),
            ("adaptiv", "adaptiv", dict(threshold=0.5, **common)),
            ("cmc_emulation", "cmc", dict(**common))]


RATIO_METHODS = {  # --ratio-arms METHOD=R: the method at a `ratio` budget (docs/video.md "RATIO")
    "focus": ("focus", dict(sic_mode="off")),
    "focus_fast": ("focus", dict(FOCUS_FAST)),
    "framefusion": ("framefusion", {}),
    "cmc": ("cmc", {}),
    "adaptiv": ("adaptiv", {}),
}


def ratio_arms(specs, frames: int):
    """(name, method, kwargs) of each --ratio-arms METHOD=R, named `METHOD@rR`."""
    out = []
    for spec in specs or ():
        key, r = spec.split("=")
        method, kw = RATIO_METHODS[key]
        out.append((f"{key}@r{float(r):g}", method, dict(kw, ratio=float(r), frames=frames)))
    return out


def parse_ratio_arm(spec: str) -> str:
    """argparse type of --ratio-arms: METHOD=R with METHOD in RATIO_METHODS and R in [0, 1)."""
    key, sep, r = spec.partition("=")
    try:
        ok = sep and key in RATIO_METHODS and 0.0 <= float(r) < 1.0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected METHOD=R with METHOD in {sorted(RATIO_METHODS)} and R in [0, 1), "
                                         f"got {spec!r}")
    return spec


def expand_matched(arm_list, fractions):
    """(name, method, kw, fraction): the FLOPs-matched arms once per MAC fraction of FrameFusion's (named
    `..._ffmatch` at 1, `..._ffmatch@F` otherwise; dropped when `fractions` is empty), the others with None."""
    for name, method, kw in arm_list:
        if not name.endswith("_ffmatch"):
            yield name, method, kw, None
            continue
        for f in fractions or ():
            yield (name if f == 1.0 else f"{name}@{f:g}"), method, kw, f


def focus_default(T: int) -> dict:
    if T < 28:
        return dict(selected_layers=(0, 1, 2, 3), alpha_list=(0.4, 0.3, 0.2, 0.1))
    return dict(selected_layers=(3, 6, 9, 18, 26), alpha_list=(0.4, 0.3, 0.2, 0.15, 0.1))


def host_ms(fn, device, repeats: int = 3):
    """Median host time to return from `fn` after an idle device (CUDA: the time to enqueue the prefill,
    including any wait at a host synchronisation inside it; close to TTFT when the host is the bottleneck)."""
    if device != "cuda":
        return None
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(out)


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # + plain cudaMemcpy


def profile_prefill(fn, device) -> dict:
    """One profiled call (torch.profiler, as bench_kv's diagnostics): total kernel time (TTFT - kernel_ms is GPU
    idle time: launch gaps, host synchronisations), kernel count, and host synchronisations (stream / device /
    event synchronize, synchronous cudaMemcpy; the final synchronize excluded). Empty off CUDA or when the
    profiler is unusable (diagnostics never fail the run)."""
    if device != "cuda":
        return {}
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernel_us, kernels, syncs = 0.0, 0, 0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernel_us += e.time_range.elapsed_us()
                kernels += 1
            elif e.name == "cudaMemcpy" or any(e.name.startswith(c) for c in SYNC_CALLS):
                syncs += 1  # a blocking copy is cudaMemcpyAsync + cudaStreamSynchronize: counted once
        return dict(kernel_ms=kernel_us / 1e3, kernels=kernels, syncs=max(0, syncs - 1))  # minus the final one
    except Exception as exc:
        print(f"profiler unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}


# aten ops that wait for the device on CUDA (a value or an output shape read on the host)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "argwhere", "equal", "is_nonzero", "bincount", "masked_select",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "scalar_tensor", "lift_fresh",
             "detach", "alias", "_local_scalar_dense", "resize_", "set_"}


def count_prefill(fn) -> dict:
    """CPU proxies of `profile_prefill`'s counts, for one call of `fn`: `ops`, the aten ops that would launch a
    device kernel (every op reaching the dispatcher but views, allocations and scalar reads; an op's own internal
    calls are not seen), `sync_ops`, the calls that synchronise the host with a CUDA device (`SYNC_OPS`, boolean
    indexing, `repeat_interleave` without `output_size`, `Tensor.tolist`), and `sync_sites`, where they were
    called from (file:line of the innermost frame under src/ or benchmarks/, with counts)."""
    import collections
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = dict(ops=0, sync_ops=0)
    sites = collections.Counter()

    def hit():
        counts["sync_ops"] += 1
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.name == "count_prefill":  # called from the model's own code
                sites["outside src/"] += 1
                break
            if "/src/mllm_efficiency/" in frame.filename or "/benchmarks/" in frame.filename:
                sites[f"{frame.filename.split('/')[-1]}:{frame.lineno}"] += 1
                break

    def is_bool(t):
        return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name.split("::")[-1]
            if name in SYNC_OPS or name in ("index", "index_put", "index_put_") and any(
                    is_bool(t) for t in (args[1] if len(args) > 1 else ())) or (
                    name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4):
                hit()
            if not func.is_view and name not in NO_KERNEL:
                counts["ops"] += 1
            return func(*args, **kwargs)

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        hit()
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with Count():
            fn()
    finally:
        torch.Tensor.tolist = tolist
    counts["sync_sites"] = "; ".join(f"{k} x{v}" for k, v in sorted(sites.items()))
    return counts


def run(args) -> dict:
    device = "cpu" if args.tiny or args.narrow or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if device == "cpu" and args.tiny:
        torch.set_num_threads(1)  # tiny matrices: threads only add contention (noisy times on a shared host)
    cfg = TINY if args.tiny else NARROW if args.narrow else QWEN2_7B
    side = 4 if args.tiny else 14
    t0 = time.time()
    model = build(cfg, device, dtype)
    print(f"model built in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    T = cfg["num_hidden_layers"]
    default = focus_default(T)
    rows = []
    for frames in args.frames:
        ids, handle = video_prompt(model, frames, side, device, dtype, static=args.static, noise=args.noise)
        prompt, n_visual = int(ids.shape[1]), frames * side * side
        dense_ms = ff_macs = None
        extra = [(n, m, kw, None) for n, m, kw in ratio_arms(args.ratio_arms, frames)]
        for name, method, kw, fraction in list(expand_matched(arms(T, frames), args.focus_match_ff)) + extra:
            is_ratio_arm = "@r" in name
            if not is_ratio_arm and (name == "cmc_emulation" and not args.with_cmc
                                     or args.arms and name.split("@")[0] not in args.arms):
                continue
            alphas, factor, predicted = kw.get("alpha_list"), None, None
            if fraction is not None:
                match = None if ff_macs is None else match_alphas(cfg, prompt, n_visual, default["selected_layers"],
                                                                   default["alpha_list"], fraction * ff_macs)
                if match is None:
                    print(f"{name} at {frames} frames skipped: " + ("framefusion_0.3 did not run" if ff_macs is None
                          else "no alpha scaling reaches framefusion's MACs"), file=sys.stderr)
                    continue
                factor, alphas = match
                kw = dict(kw, alpha_list=alphas)
            if method == "focus" and alphas is not None:
                predicted = ops(cfg, *focus_schedule(T, prompt, n_visual, kw["selected_layers"], alphas)) / 1e12
            h = me.apply(model, method, **kw) if method else None
            t_arm = time.time()
            try:
                def prefill():
                    with torch.no_grad():
                        return model(input_ids=ids, use_cache=True, logits_to_keep=1)
                out = prefill()
                cache = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
                lens = [cache.layers[i].keys.shape[-2] for i in range(T)]
                del out, cache
                t = time_cuda(prefill, warmup=args.warmup, repeats=args.repeats, device=device)
                host = host_ms(prefill, device)
                prof = {} if not args.profile else profile_prefill(prefill, device) if device == "cuda" \
                    else count_prefill(prefill)
                st = h.stats if h else None
                gemm_rows = st.gemm_rows() if hasattr(st, "gemm_rows") else None
                dedup = getattr(st, "dedup_rows", None) or None
                sparsity = None
                if name.startswith("focus") and st.sic_counts:
                    sparsity = sum(st.sic_sparsity(g, l) for g, l in st.sic_counts) / len(st.sic_counts)
                if name == "adaptiv":
                    sparsity = st.token_sparsity
                if name == "cmc_emulation":
                    sparsity = st.linear_sparsity
                tmacs = ops(cfg, lens, gemm_rows) / 1e12
                row = dict(frames=frames, arm=name, prompt=prompt, ttft_ms=t.median_ms,
                           p10_ms=t.p10_ms, p90_ms=t.p90_ms, host_ms=host, **prof,
                           mean_tokens=sum(lens) / T, tmacs=tmacs, sparsity=sparsity,
                           rows_removed_q=st.rows_removed("q_proj") if dedup else None,
                           rows_removed_down=st.rows_removed("down_proj") if dedup else None,
                           alphas="/".join(f"{a:g}" for a in alphas) if alphas else None,
                           alpha_factor=factor)
                if is_ratio_arm:  # the budget each method reached (layer-averaged share of visual tokens removed)
                    row["requested_ratio"] = kw["ratio"]
                    row["removed_fraction"] = getattr(st, "removed_fraction", None)
                    solved = getattr(getattr(h, "_attached", None), "config", None)  # focus: the solved schedule
                    if method == "focus" and getattr(solved, "alpha_list", None):
                        row["alphas"] = "/".join(f"{a:g}" for a in solved.alpha_list)
                if method == "focus" and predicted is not None:
                    # MACs of the same arm without crediting token_dedup (only the SEC-kept rows): <= the target
                    # of a FLOPs-matched arm whether or not the deduplicated rows are counted
                    row["tmacs_sec"] = predicted
                    sec_rows = {(g, l): v for l, v in st.mlp_rows.items() for g in ("gate_proj", "down_proj")}
                    sec_measured = ops(cfg, lens, sec_rows) / 1e12
                    if not math.isclose(sec_measured, predicted, rel_tol=1e-9):
                        print(f"warning: {name}: SEC MACs {sec_measured:.4f} T differ from the schedule's "
                              f"{predicted:.4f} T", file=sys.stderr)
                if factor is not None:
                    row["target_tmacs"] = fraction * ff_macs / 1e12
                if name == "dense":
                    dense_ms = t.median_ms
                if name == "framefusion_0.3":
                    ff_macs = tmacs * 1e12
                row["speedup"] = dense_ms / t.median_ms if dense_ms else None
                row["arm_s"] = time.time() - t_arm  # wall time of the arm's calls (budgeting runs)
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                if h:
                    h.remove()
        handle.remove()
        for row in rows:  # theoretical MACs relative to framefusion's at the same frame count
            if row["frames"] == frames and ff_macs:
                row["macs_vs_ff"] = row["tmacs"] * 1e12 / ff_macs
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", config=cfg, rows=rows,
                static=args.static, noise=args.noise, focus_selected_layers=list(default["selected_layers"]),
                note=f"LLM prefill only (vision tower not run); synthetic temporally-redundant visual embeddings "
                     f"({args.static:.0%} static positions, noise {args.noise}); "
                     "cmc is an emulation (dense GEMMs), its time is not a speedup")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke run)")
    ap.add_argument("--narrow", action="store_true",
                    help="CPU proxy of the 7B shape for --profile's op / sync counts: 28 layers (the 7B's Focus "
                         "layers and SEC stages), 256 wide, 14 x 14 frames (10-15 s per 64-frame prefill)")
    ap.add_argument("--frames", type=int, nargs="+", default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--with-cmc", action="store_true", help="also time the CMC emulation (slow)")
    ap.add_argument("--focus-match-ff", type=float, nargs="*", default=None, metavar="F",
                    help="also run Focus (SEC only, SEC + token_dedup) with its alphas scaled by one factor so that "
                         "its MACs are just at or below F x FrameFusion's at the same frame count (no F: F = 1; "
                         "several F: one pair of arms each, named ..._ffmatch@F)")
    ap.add_argument("--arms", nargs="+", default=None, help="run only these arms (names as in the table)")
    ap.add_argument("--ratio-arms", nargs="+", default=None, type=parse_ratio_arm, metavar="METHOD=R",
                    help=f"also time METHOD ({', '.join(RATIO_METHODS)}) at the budget ratio=R (layer-averaged share "
                         "of visual tokens removed), as arm METHOD@rR (always run, --arms or not); "
                         "benchmarks/video/equal_accuracy.py prints the equal-accuracy pair")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: one more prefill per arm under torch.profiler: kernel_ms (total kernel time; "
                         "TTFT - kernel_ms is GPU idle time), kernels, syncs (blocking host API calls); CPU: one "
                         "more prefill per arm counting ops (aten ops that would launch a kernel) and sync_ops "
                         "(calls that would synchronise with a GPU; their call sites in the JSON's sync_sites)")
    ap.add_argument("--static", type=float, default=0.5,
                    help="fraction of grid positions that do not move between frames (temporal redundancy)")
    ap.add_argument("--noise", type=float, default=0.15, help="per-frame noise on every token (x embedding std)")
    args = ap.parse_args(argv)
    if args.tiny and args.narrow:
        ap.error("--tiny and --narrow are exclusive")
    known = [name for name, _, _ in arms(28, 1)]
    if args.arms and not set(args.arms) <= set(known):
        ap.error(f"--arms: unknown {sorted(set(args.arms) - set(known))}; known: {known}")
    if args.focus_match_ff == []:
        args.focus_match_ff = [1.0]
    if any(not 0.0 < f <= 1.0 for f in args.focus_match_ff or ()):
        ap.error(f"--focus-match-ff: each F must be in (0, 1], got {args.focus_match_ff}")
    if not 0.0 <= args.static <= 1.0 or args.noise < 0:
        ap.error(f"--static must be in [0, 1] and --noise >= 0, got {args.static} and {args.noise}")
    args.frames = args.frames or ([4, 8] if args.tiny else [32, 64])
    t0 = time.time()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    cols = ["frames", "arm", "prompt", "ttft_ms", "speedup", "requested_ratio", "removed_fraction", "host_ms", "kernel_ms", "kernels", "syncs", "ops",
            "sync_ops", "mean_tokens", "tmacs", "tmacs_sec", "macs_vs_ff", "alphas", "sparsity", "rows_removed_q",
            "rows_removed_down"]
    cols = [c for c in cols if any(r.get(c) is not None for r in res["rows"]) or c in ("frames", "arm")]
    md = (f"Device: {res['device']}. {res['note']}. Focus selected layers {res['focus_selected_layers']}; "
          "tmacs counts the rows each GEMM computed (token_dedup credited), tmacs_sec the same arm without the "
          "token_dedup credit.\n\n" + markdown_table(res["rows"], cols, float_digits=3))
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
