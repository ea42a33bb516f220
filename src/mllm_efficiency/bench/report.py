"""What every benchmark script shares: random-weight models built on the device, JSON-safe results, outputs."""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch


def build_random_model(model_cls, config, device, dtype: torch.dtype, seed: int):
    """`model_cls(config)` with random init (HF: normal std 0.02) built directly on `device` in `dtype`;
    latency and memory do not depend on weight values."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(prev)
    model.to(dtype)  # no-op for parameters; makes sure nothing stayed in another float type
    model.eval()
    model.requires_grad_(False)
    return model


def jsonable(x: Any) -> Any:
    """Tensors to lists, NaN/inf to None, keys to strings (recursively)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def write_outputs(result: dict, markdown: str, json_path: str | None, markdown_path: str | None) -> None:
    for path, text in ((json_path, json.dumps(jsonable(result), indent=1)), (markdown_path, markdown)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
            print(f"wrote {path}", file=sys.stderr)


def cache_kwarg(model) -> str:
    """The forward's cache argument: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The cache a forward returned, whichever name the installed transformers gives it."""
    for name in ("cache", "past_key_values"):
        c = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if c is not None:
            return c
    raise RuntimeError("the model returned no cache (use_cache=True)")


@contextlib.contextmanager
def sliced_layers(text_model, start: int, stop: int):
    """Temporarily keep only decoder layers [start, stop) (layer_idx of each layer is unchanged)."""
    original = text_model.layers
    text_model.layers = torch.nn.ModuleList(list(original)[start:stop])
    try:
        yield
    finally:
        text_model.layers = original


def ideal_pruned_shape(ttft, text_model, full_inputs, short_inputs, k: int, t_full_l, t_full_lp) -> dict:
    """Cost of a pruned prefill's shape on the unmodified model: layers[:k] on the full inputs plus layers[k:]
    on the short ones, minus one call with no layers (embeddings, RoPE table, norm, head: counted twice
    otherwise). `ttft(inputs)` returns a TimingResult; `interp_ms` interpolates full-model timings instead."""
    T = len(text_model.layers)
    with sliced_layers(text_model, 0, k):
        seg1 = ttft(full_inputs)
    with sliced_layers(text_model, k, T):
        seg2 = ttft(short_inputs)
    with sliced_layers(text_model, 0, 0):
        shell = ttft(short_inputs)
    interp = None
    if t_full_lp is not None:
        interp = k / T * t_full_l.median_ms + (T - k) / T * t_full_lp.median_ms
    return {"direct_ms": seg1.median_ms + seg2.median_ms - shell.median_ms,
            "segments_sum_ms": seg1.median_ms + seg2.median_ms,
            "first_k_layers_at_L": seg1.as_dict(), "last_layers_at_Lp": seg2.as_dict(),
            "shell_at_Lp": shell.as_dict(), "interp_ms": interp,
            "full_model_at_Lp": t_full_lp.as_dict() if t_full_lp is not None else None}


# ------------------------------------------------------------------------------------------------ mllm-eff bench
_BENCH_COLUMNS = [
    ("entry", "entry"), ("vision_ms", "vision ms"), ("ttft_ms", "TTFT ms"), ("ttft_spread", "TTFT p10–p90"),
    ("ttft_speedup", "TTFT speedup"), ("llm_prefill_speedup", "LLM prefill speedup"),
    ("prefill_gflops", "prefill GFLOPs"), ("flops_ratio", "FLOPs ratio"), ("kv_mib", "KV MiB"),
    ("kv_reduction", "KV cut"), ("first_logits_max_diff", "logit Δ vs vanilla"), ("prefill_peak_gib", "prefill peak GiB"),
    ("hf_step_ms", "hf step ms"), ("hf_tok_s", "hf tok/s"), ("hf_over_roofline", "hf / roofline"),
    ("fast_step_ms", "fast step ms"), ("fast_tok_s", "fast tok/s"), ("fast_over_roofline", "fast / roofline"),
    ("fast_over_hf", "fast / hf speedup"), ("e2e_hf_ms", "generate ms (stock)"),
    ("e2e_fast_ms", "generate ms (fast path)"), ("e2e_fast_over_hf", "fast path / stock"), ("roofline_ms", "roofline ms"),
    ("steady_gib", "steady GiB"), ("peak_gib", "peak GiB"), ("error", "error"),
]


def bench_markdown(result: dict) -> str:
    """The `mllm-eff bench` result as markdown: a header naming model, prompt, device and bandwidth, then one
    row per entry (columns without any value are left out)."""
    from .harness import summary_rows
    from .timing import markdown_table

    rows = summary_rows(result)
    for r in rows:
        if "ttft_p10_ms" in r:
            r["ttft_spread"] = f"{r['ttft_p10_ms']:.2f}–{r['ttft_p90_ms']:.2f}"
        backend = "fast" if "fast_step_ms" in r else "hf"
        for key in ("roofline_ms", "steady_gib", "peak_gib"):
            if f"{backend}_{key}" in r:
                r[key] = r[f"{backend}_{key}"]
    cols = [c for c in _BENCH_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    s, p, bw = result["settings"], result["prompt"], result["bandwidth"]
    env = result["environment"]
    device = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    head = [f"**{s['model']}** ({result['model']['source']}), {s['dtype']}, attention {s['attn']}, on {device}",
            f"prompt: {p['shape']} = {p['length']} tokens per row ({p['visual_tokens']} visual), batch {p['batch']}",
            f"decode: {s['decode']}, {s['new_tokens']} timed steps after {s['decode_warmup']} warm-up; prefill: "
            f"{s['repeats']} timed calls after {s['warmup']} warm-up; medians (p10–p90)",
            f"bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (device copy); decode weights read "
            f"{result['model']['decode_weight_bytes_read'] / 2 ** 30:.2f} GiB per step; roofline = (weights + KV) / "
            "bandwidth",
            "FLOPs ratio and speedups: vanilla / entry; TTFT includes the vision encoder, LLM prefill = TTFT − vision."]
    return "\n".join(["- " + h for h in head]) + "\n\n" + markdown_table(rows, cols, float_digits=3) + "\n"


def bench_plot(result: dict, path) -> str | None:
    """Measured prefill speedup against the theoretical FLOPs ratio (y = x is the ideal). Returns a note instead
    of writing when matplotlib is missing or nothing can be plotted."""
    from .harness import summary_rows

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install matplotlib)"
    pts = []
    for r in summary_rows(result):
        y = r.get("llm_prefill_speedup") if r.get("vision_ms") else r.get("ttft_speedup")
        if r.get("flops_ratio") is not None and y is not None:
            pts.append((r["flops_ratio"], y, r["entry"]))
    if not pts:
        return "no entry has both a FLOPs ratio and a measured speedup (is vanilla listed?): plot skipped"
    fig, ax = plt.subplots(figsize=(6.5, 5))
    top = max(max(x for x, _, _ in pts), max(y for _, y, _ in pts), 1.0) * 1.1
    ax.plot([0, top], [0, top], "--", color="grey", label="speedup = FLOPs ratio")
    for x, y, label in pts:
        ax.scatter([x], [y])
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("theoretical prefill FLOPs ratio (vanilla / method)")
    ax.set_ylabel("measured prefill speedup (vanilla / method)")
    ax.set_title(f"{result['settings']['model']}: {result['prompt']['shape']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_bench(result: dict, out_dir, stem: str = "bench", plot: bool = True) -> dict:
    """Write `<stem>.json`, `<stem>.md` and (if possible) `<stem>.png` into `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = bench_markdown(result)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    note = None
    if plot:
        note = bench_plot(result, out / f"{stem}.png")
        if note is None:
            paths["plot"] = out / f"{stem}.png"
    if note:
        md += f"\n_{note}_\n"
        result = dict(result, plot_note=note)
    write_outputs(result, md, str(paths["json"]), str(paths["markdown"]))
    return paths
