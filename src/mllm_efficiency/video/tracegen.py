"""Generate Focus traces for a model x dataset x first N samples, keep the median-sparsity sample, and write the
baselines' CSVs (docs/video.md, "Sparse traces"). Models here are the tiny random builders (offline); samples are
seeded synthetic videos (frames = a shared base + noise, so adjacent frames are similar)."""
from __future__ import annotations

from pathlib import Path

import torch

import mllm_efficiency as me
from . import trace as TR

TINY_MODELS = ("tiny-onevision", "tiny-qwen2.5-vl")


def build_model(name: str, num_layers: int = 4):
    from .. import tiny

    if name == "tiny-onevision":
        return tiny.tiny_llava_onevision(num_layers=num_layers)
    if name == "tiny-qwen2.5-vl":
        return tiny.tiny_qwen2_5_vl(num_layers=num_layers)
    raise ValueError(f"model must be one of {list(TINY_MODELS)}, got {name!r}")


def synthetic_sample(model_name: str, model, index: int, seed: int, frames: int = 8, noise: float = 0.3) -> dict:
    from .. import tiny

    g = torch.Generator().manual_seed(seed * 100_003 + index)
    if model_name == "tiny-onevision":
        base = torch.randn(1, 1, 3, 32, 32, generator=g)
        video = base + noise * torch.randn(1, frames, 3, 32, 32, generator=g)
        p = tiny.onevision_video_prompt(model, frames=frames)
        p["pixel_values_videos"] = video
        return p
    return qwen_video_prompt(frames=frames, generator=g, noise=noise)


def qwen_video_prompt(frames: int = 4, h: int = 4, w: int = 4, generator=None, noise: float = 0.3) -> dict:
    """Qwen2-VL / 2.5-VL video prompt (batch 1): `frames` frames of h x w patches (temporal patch 2)."""
    from ..tiny import QWEN_VEND, QWEN_VIDEO, QWEN_VSTART

    t = frames // 2
    n = t * h * w // 4
    ids = torch.tensor([[5, 6, QWEN_VSTART] + [QWEN_VIDEO] * n + [QWEN_VEND, 7, 8, 9]])
    base = torch.randn(1, h * w, 96, generator=generator)
    pix = (base + noise * torch.randn(t, h * w, 96, generator=generator)).reshape(t * h * w, 96)
    return dict(input_ids=ids, pixel_values_videos=pix, video_grid_thw=torch.tensor([[t, h, w]]),
                mm_token_type_ids=(ids == QWEN_VIDEO).int() * 2)


def _weights(model, adapter, n_visual: int) -> dict:
    c = adapter.text_config
    return TR.gemm_weights(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                           c.num_key_value_heads or c.num_attention_heads, n_visual)


def generate_traces(model_name: str, dataset: str, samples: int, out: str | Path, seed: int = 0,
                    focus_kwargs: dict | None = None, subdir: str = "focus_main", trace_name: str | None = None,
                    median_index: int | None = None, baselines: bool = True, frames: int = 8) -> dict:
    """Run Focus on the first `samples` samples, write the median one's lean trace under out/subdir/, append
    meta_data.csv (and adaptiv/cmc CSVs). Returns a summary dict."""
    from ..adapters import get_adapter

    if dataset != "synthetic":
        raise ValueError(f"dataset must be 'synthetic' (offline), got {dataset!r}")
    torch.manual_seed(seed)
    model = build_model(model_name)
    adapter = get_adapter(model)
    kwargs = dict(selected_layers=(0, 1), alpha_list=(0.6, 0.4), similarity_threshold=0.5, gemm_m_size=-1)
    kwargs.update(focus_kwargs or {})
    kwargs["record_trace"] = True
    out = Path(out)
    sparsities = []
    inputs = [synthetic_sample(model_name, model, i, seed, frames) for i in range(samples)]
    with torch.no_grad(), me.apply(model, "focus", **kwargs) as h:
        if median_index is None:
            for p in inputs:
                model(**p)
                w = _weights(model, adapter, h.stats.num_visual[0])
                sparsities.append(TR.weighted_sparsity(h.stats, w, adapter.num_layers))
            order = sorted(range(samples), key=lambda i: (sparsities[i], i))
            median_index = order[(samples - 1) // 2]
        p = inputs[median_index]
        model(**p)
        att = h._attached
        name = trace_name or f"{model_name}_{dataset}"
        meta = {"model": model_name, "dataset": dataset, "sample_index": median_index,
                "sequence_length": int(p["input_ids"].shape[1]), "seed": seed}
        TR.write_lean_trace(out / subdir / name, att, meta)
        layout = att.layout_source.layout.describe(0)
    TR.append_csv(out / "meta_data.csv", TR.META_HEADER,
                  [model_name, dataset, int(p["input_ids"].shape[1]), layout["n_frames"], layout["n_visual"],
                   median_index])
    summary = {"median_index": median_index, "sparsities": sparsities, "trace": str(out / subdir / name)}
    if baselines:
        with torch.no_grad(), me.apply(model, "adaptiv") as h:
            model(**p)
            TR.append_csv(out / "adaptiv_sparsity.csv", TR.ADAPTIV_HEADER,
                          [model_name, dataset, round(h.stats.token_sparsity, 6)])
        with torch.no_grad(), me.apply(model, "cmc") as h:
            model(**p)
            s = h.stats
            TR.append_csv(out / "cmc_sparsity.csv", TR.CMC_HEADER,
                          [model_name, dataset, round(s.linear_sparsity, 6), round(s.query_sparsity, 6), ""])
    return summary


DSE_SWEEPS = {
    "tile": ("m_tile_size_dse", "gemm_m_size", [-1, 4096, 2048, 1024, 512, 128, 32]),
    "vector": ("vector_size_dse", "vector_size", [4096, 2048, 512, 128, 32, 8]),
    "block": ("block_size_dse", "block", [(t, s) for t in (1, 2, 3) for s in (1, 2, 3) if (t, s) != (1, 1)]),
}


def run_dse(model_name: str, sweep: str, samples: int, out: str | Path, seed: int = 0) -> list[dict]:
    """Traces + sparsity for one sweep, all at the median sample of the default setting."""
    if sweep not in DSE_SWEEPS:
        raise ValueError(f"sweep must be one of {sorted(DSE_SWEEPS)}, got {sweep!r}")
    base = generate_traces(model_name, "synthetic", samples, Path(out) / "_base", seed, baselines=False)
    subdir, field, values = DSE_SWEEPS[sweep]
    rows = []
    for v in values:
        if field == "block":
            kw, tag = dict(frame_block_size=v[0], block_size=v[1]), f"{v[0]}x{v[1]}x{v[1]}"
        else:
            kw, tag = {field: v}, str(v)
        res = generate_traces(model_name, "synthetic", samples, out, seed, kw, subdir=subdir,
                              trace_name=f"{model_name}_synthetic_{tag}", median_index=base["median_index"],
                              baselines=False)
        meta, _ = TR.read_lean_trace(res["trace"])
        vals = list(meta["sparsity"].values())
        rows.append({"setting": tag, "mean_sparsity": sum(vals) / max(len(vals), 1), "trace": res["trace"]})
    return rows
