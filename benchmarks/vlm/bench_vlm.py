#!/usr/bin/env python3
"""FastV on 7B VLM language models: TTFT speedup vs theoretical FLOPs ratio, multi-image and 32-frame video.

Two presets, random weights (latency does not depend on weight values), built directly on the device:
  llava-onevision-7b  LLaVA-OneVision-7B's language model (Qwen2-7B shape: hidden 3584, MLP 18944, 28 layers,
                      28 heads / 4 KV heads, vocab 152064, RoPE theta 1e6) as `Qwen2ForCausalLM`. The visual
                      tokens form one contiguous span, given to FastV as image_token_start_index / length.
                      images: 8 x 729 (27x27 SigLIP grid per image, anyres tiles ignored) = 5,832 tokens
                      video:  32 frames x 196 (each frame pooled to 14x14)                 = 6,272 tokens
  qwen2-vl-7b         `Qwen2VLForConditionalGeneration` with the full Qwen2-VL-7B text config (same dims,
                      M-RoPE mrope_section [16, 24, 24]) and a tiny, never-called vision tower, so the text
                      model is the real `Qwen2VLTextModel`. Prompt in the processor's layout, each image or
                      video as <|vision_start|> pads <|vision_end|>; 3-row M-RoPE position ids from the
                      model's own `get_rope_index`.
                      images: 8 images of grid (1, 54, 54) -> 27x27 = 729 tokens each     = 5,832 tokens
                      video:  32 frames, video_grid_thw (16, 28, 28) -> 16x14x14           = 3,136 tokens
Each prompt also holds --prefix (40) text tokens before the first visual token and --text (30) after it.

TTFT is the LLM prefill; the vision tower (and projector) would run identically in both arms and is
excluded. llava-onevision-7b: `model(ids, use_cache=True, logits_to_keep=1)`. qwen2-vl-7b:
`model(input_ids=ids, inputs_embeds=E, position_ids=P, use_cache=True, logits_to_keep=1)`: with no pixel
values and given position ids, Qwen2VLModel.forward runs neither the vision tower nor get_rope_index, so
this is exactly `model.model.language_model(inputs_embeds=E, position_ids=P, use_cache=True)` + `lm_head` on
the last position; the input_ids only let FastV find the visual tokens (the model's image/video token ids),
which the 8-image prompt needs because its 8 spans are separated by start/end markers. E holds embeddings of
random token ids (a stand-in for the vision features).

For every preset, prompt and R (all in one process):
  vanilla   TTFT of the unmodified model at L tokens, peak memory
  fastv     the same with `me.apply(model, "fastv", k=K, ratio=R, ...)` (inplace), peak memory; the FastV
            stats (kept count, pruned length, per-layer cache lengths) are checked against the keep rule
  ideal     the unmodified model's cost of the pruned shape: decoder layers[:K] at L plus layers[K:] at
            L' = L - (N - keep) (slicing the text model's `layers`), minus one "shell" call at L'
            (embeddings / RoPE table / mask / final norm / LM head on 1 token, counted twice by the two
            segment calls); also interpolated as K/T * t_full(L) + (T-K)/T * t_full(L')
  overhead  fastv / ideal(direct) - 1: what scoring, gathers and hooks cost
  FLOPs     paper Eq. 5 ratio and exact prefill ratio (pruned / baseline) from mllm_efficiency.flops;
            "speedup / FLOPs" = measured speedup divided by the speedup the exact FLOPs ratio predicts

GPU (H100, ~2.5-3.5 min for both presets and both prompts):
  PYTHONPATH=src python3 benchmarks/vlm/bench_vlm.py --preset llava-onevision-7b qwen2-vl-7b --device cuda \
      --dtype bf16 --out benchmarks/vlm/results.json --markdown benchmarks/vlm/results.md
CPU smoke (seconds; checks the mechanics only):
  python benchmarks/vlm/bench_vlm.py --preset tiny-llava-onevision tiny-qwen2-vl --device cpu --dtype fp32 \
      --repeats 2 --warmup 1 --out /tmp/vlm.json --markdown /tmp/vlm.md
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
from mllm_efficiency.adapters import get_adapter
from mllm_efficiency.bench.timing import (GIB, environment_info, markdown_table, peak_memory, synchronize,
                                          time_cuda)
from mllm_efficiency.flops import visual_keep_count as keep_count  # noqa: E402
from mllm_efficiency.pruning.fastv import token_spans
from mllm_efficiency.bench.models import build_random_model, ideal_pruned_shape  # noqa: E402
from mllm_efficiency.bench.report import write_outputs  # noqa: E402

# ------------------------------------------------------------------------------------------------ presets
_QWEN2_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False,
                      initializer_range=0.02, bos_token_id=151643, eos_token_id=151645)
_TINY_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False, initializer_range=0.02,
                  bos_token_id=1, eos_token_id=2)
# never called: keeps Qwen2VLForConditionalGeneration small (the merger's output width is the text hidden size)
_TINY_VISION = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2)
_QWEN2VL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                       vision_end_token_id=151653)
_TINY_TOKENS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)

PRESETS = {
    "llava-onevision-7b": dict(
        family="qwen2", name="LLaVA-OneVision-7B language model (Qwen2-7B shape)", rope_theta=1e6,
        text=_QWEN2_7B_TEXT,
        prompts={"images": dict(items=8, tokens_per_item=729, what="8 images × 729 (27×27 SigLIP grid)"),
                 "video": dict(items=32, tokens_per_item=196, what="32 frames × 196 (14×14 pooled)")}),
    "qwen2-vl-7b": dict(
        family="qwen2_vl", name="Qwen2-VL-7B text model (M-RoPE)", rope_theta=1e6, mrope_section=[16, 24, 24],
        text=_QWEN2_7B_TEXT, vision=_TINY_VISION, tokens=_QWEN2VL_TOKENS,
        prompts={"images": dict(kind="image", grids=[(1, 54, 54)] * 8,
                                what="8 images, grid (1, 54, 54) → 27×27 = 729 tokens each"),
                 "video": dict(kind="video", grids=[(16, 28, 28)],
                               what="32-frame video, grid (16, 28, 28) → 16×14×14")}),
    # CPU smoke runs
    "tiny-llava-onevision": dict(
        family="qwen2", name="tiny Qwen2", rope_theta=1e6, text=_TINY_TEXT,
        prompts={"images": dict(items=8, tokens_per_item=16, what="8 images × 16"),
                 "video": dict(items=32, tokens_per_item=6, what="32 frames × 6")}),
    "tiny-qwen2-vl": dict(
        family="qwen2_vl", name="tiny Qwen2-VL text model (M-RoPE)", rope_theta=1e6, mrope_section=[2, 3, 3],
        text=_TINY_TEXT, vision=_TINY_VISION, tokens=_TINY_TOKENS,
        prompts={"images": dict(kind="image", grids=[(1, 8, 8)] * 8, what="8 images, grid (1, 8, 8) → 16 tokens each"),
                 "video": dict(kind="video", grids=[(16, 4, 4)], what="32-frame video, grid (16, 4, 4) → 16×2×2")}),
}
DEFAULT_PRESETS = ["llava-onevision-7b", "qwen2-vl-7b"]
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=DEFAULT_PRESETS,
                   help="run these presets one after the other in this process (each model is freed before the next)")
    p.add_argument("--prompts", nargs="+", choices=["images", "video"], default=["images", "video"],
                   help="prompt shapes: 8 images and/or a 32-frame video")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation of the model (same in every arm)")
    p.add_argument("--prefix", type=int, default=40, help="text tokens before the first visual span")
    p.add_argument("--text", type=int, default=30, help="text tokens after the last visual span")
    p.add_argument("--k", type=int, default=2, help="FastV K: first layer that runs on the pruned sequence")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75], help="FastV R (fraction dropped)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--min-time", type=float, default=None,
                   help="raise the timed calls of a measurement to about this many seconds in total (up to 200 "
                        "calls); default 2.0 on cuda, 0 on cpu")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads with --device cpu (1 keeps a smoke run stable on a shared machine)")
    p.add_argument("--no-interp", action="store_true", help="skip the full-model timings at L' (interpolated ideal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the raw results as JSON here (default: not written)")
    p.add_argument("--markdown", default=None, help="write the markdown tables here (default: stdout only)")
    args = p.parse_args(argv)
    if args.min_time is None:
        args.min_time = 2.0 if torch.device(args.device).type == "cuda" else 0.0
    for r in args.ratios:
        if not 0.0 <= r < 1.0:
            p.error(f"--ratios: every R must be in [0, 1), got {r}")
    if args.repeats < 1 or args.warmup < 0 or args.prefix < 0 or args.text < 0:
        p.error("need --repeats >= 1, --warmup >= 0, --prefix >= 0, --text >= 0")
    args.preset = list(dict.fromkeys(args.preset))
    args.prompts = list(dict.fromkeys(args.prompts))
    return args


class Log:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ models
def _fields(cls) -> set:
    f = getattr(cls, "__dataclass_fields__", None)
    return set(f) if f else set(inspect.signature(cls).parameters)


def _rope(cls, theta: float, mrope_section=None) -> dict:
    """rope kwargs for a config class: transformers 5.x `rope_parameters`, 4.x `rope_theta` (+ rope_scaling)."""
    if "rope_parameters" in _fields(cls):
        rp = {"rope_type": "default", "rope_theta": theta}
        if mrope_section is not None:
            rp["mrope_section"] = list(mrope_section)
        return {"rope_parameters": rp}
    out = {"rope_theta": theta}
    if mrope_section is not None:
        out["rope_scaling"] = {"type": "mrope", "mrope_section": list(mrope_section)}
    return out


def build_config(preset: str, attn: str):
    spec = PRESETS[preset]
    if spec["family"] == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**spec["text"], **_rope(Qwen2Config, spec["rope_theta"]), attn_implementation=attn)
    from transformers import Qwen2VLConfig
    try:
        from transformers import Qwen2VLTextConfig
    except ImportError:  # very old releases: flat config
        Qwen2VLTextConfig = Qwen2VLConfig
    text = dict(spec["text"], **_rope(Qwen2VLTextConfig, spec["rope_theta"], spec["mrope_section"]))
    vision = dict(spec["vision"], hidden_size=text["hidden_size"])
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **spec["tokens"],
                         attn_implementation=attn)


def build_model(preset: str, config, device: torch.device, dtype: torch.dtype, seed: int):
    """Random-init model built directly on `device` in `dtype`."""
    if PRESETS[preset]["family"] == "qwen2":
        from transformers import Qwen2ForCausalLM as cls
    else:
        from transformers import Qwen2VLForConditionalGeneration as cls
    return build_random_model(cls, config, device, dtype, seed)


def text_config_of(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else getattr(config, "text_config", config)


# ------------------------------------------------------------------------------------------------ prompts
def rope_index(model, ids: torch.Tensor, types: torch.Tensor, image_grid, video_grid) -> torch.Tensor:
    """3-row M-RoPE position ids from the model's own get_rope_index (signature differs between releases)."""
    inner = model.model
    fn = inner.get_rope_index
    params = inspect.signature(fn).parameters
    kw = dict(image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=None)
    if "mm_token_type_ids" in params:  # transformers >= 5.x: modality runs from mm_token_type_ids
        kw["mm_token_type_ids"] = types
    out = fn(ids, **kw)
    pos = out[0] if isinstance(out, (tuple, list)) else out
    return pos


def build_prompt(preset: str, name: str, model, config, args, device, gen: torch.Generator) -> dict:
    spec = PRESETS[preset]
    pspec = spec["prompts"][name]
    tcfg = text_config_of(config)
    vocab = tcfg.vocab_size
    if spec["family"] == "qwen2":
        N = pspec["items"] * pspec["tokens_per_item"]
        L = args.prefix + N + args.text
        ids = torch.randint(3, vocab, (1, L), generator=gen)
        return {"name": name, "what": pspec["what"], "L": L, "N": N, "items": pspec["items"],
                "tokens_per_item": pspec["tokens_per_item"], "spans": [(args.prefix, N)],
                "flops_prefix": args.prefix, "flops_text": args.text,
                "layout": f"{args.prefix} text + {N} visual (one contiguous span) + {args.text} text",
                "fastv_kwargs": {"image_token_start_index": args.prefix, "image_token_length": N},
                "visual_source": "image_token_start_index / image_token_length",
                "inputs": {"input_ids": ids.to(device)}, "position_ids": None}
    tok = spec["tokens"]
    merge = config.vision_config.spatial_merge_size
    pad = tok["image_token_id"] if pspec["kind"] == "image" else tok["video_token_id"]
    type_id = 1 if pspec["kind"] == "image" else 2
    low = min(tok.values())  # random text ids stay below every special token
    seq, types = [], []

    def text(n):
        seq.extend(torch.randint(3, low, (n,), generator=gen).tolist())
        types.extend([0] * n)

    text(args.prefix)
    per_item = []
    for (t, h, w) in pspec["grids"]:
        n = t * (h // merge) * (w // merge)
        per_item.append(n)
        seq.append(tok["vision_start_token_id"]); types.append(0)
        seq.extend([pad] * n); types.extend([type_id] * n)
        seq.append(tok["vision_end_token_id"]); types.append(0)
    text(args.text)
    ids = torch.tensor([seq])
    tt = torch.tensor([types])
    grid = torch.tensor([list(g) for g in pspec["grids"]])
    with torch.inference_mode():
        pos = rope_index(model, ids.to(device), tt.to(device), grid.to(device) if type_id == 1 else None,
                         grid.to(device) if type_id == 2 else None)
    L, N = ids.shape[1], sum(per_item)
    visual = tt[0] > 0
    spans = token_spans(visual)
    last = spans[-1][0] + spans[-1][1]
    # stand-in features: embeddings of random ids at every position (the pads' own embedding would be identical)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(torch.randint(3, low, (1, L), generator=gen).to(device))
    if len(spans) == 1:
        fkw = {"image_token_start_index": spans[0][0], "image_token_length": spans[0][1]}
        source = "image_token_start_index / image_token_length (checked against the ids by FastV)"
    else:
        fkw = {}
        source = f"detected from input_ids ({len(spans)} spans of the {pspec['kind']} token id)"
    return {"name": name, "what": pspec["what"], "L": L, "N": N, "items": len(per_item), "tokens_per_item": per_item[0],
            "grids": [list(g) for g in pspec["grids"]], "spans": spans,
            # Eq. 5 counts the tokens up to the last visual one (markers between spans included); exact FLOPs all
            "flops_prefix": last - N, "flops_text": L - last,
            "layout": (f"{args.prefix} text + {len(per_item)} × (<vision_start> {per_item[0]} pads <vision_end>) + "
                       f"{args.text} text"),
            "fastv_kwargs": fkw, "visual_source": source,
            "inputs": {"input_ids": ids.to(device), "inputs_embeds": embeds}, "position_ids": pos,
            "mrope_max_position": int(pos.max()), "mrope_position_ids_shape": list(pos.shape)}


def sliced_inputs(prompt: dict, n: int | None) -> dict:
    kw = {k: (v if n is None else v[:, :n]) for k, v in prompt["inputs"].items()}
    pos = prompt["position_ids"]
    if pos is not None:
        kw["position_ids"] = pos if n is None else pos[..., :n]
    return kw


# ------------------------------------------------------------------------------------------------ measures
class Bench:
    def __init__(self, model, args, device: torch.device):
        self.model, self.args, self.device = model, args, device
        self.text_model = get_adapter(model).text_model

    def prefill(self, kw):
        return self.model(**kw, use_cache=True, logits_to_keep=1)

    def ttft(self, kw):
        a = self.args
        return time_cuda(lambda: self.prefill(kw), warmup=a.warmup, repeats=a.repeats, device=self.device,
                         min_time_s=a.min_time)

    def memory(self, kw):
        gc.collect()
        return peak_memory(lambda: self.prefill(kw), device=self.device)

    def ideal(self, prompt, k: int, lp: int, t_full_l, t_full_lp) -> dict:
        return ideal_pruned_shape(self.ttft, self.text_model, sliced_inputs(prompt, None), sliced_inputs(prompt, lp),
                                  k, t_full_l, t_full_lp)


def flops_report(config, prefix: int, n_visual: int, text: int, k: int, ratio: float) -> dict | None:
    try:
        from mllm_efficiency import flops as F

        shape = F.LayerShape.from_config(config)
        rep = F.fastv_flops(shape, prefix, n_visual, text, k, ratio)
        out = {name: getattr(rep, name) for name in ("paper_eq5_ratio", "exact_ratio", "equivalent_tokens", "keep")}
        out["report"] = rep.as_dict()
        return out
    except Exception as exc:
        print(f"note: FLOPs computation failed ({type(exc).__name__}: {exc}); FLOPs ratios are n/a", file=sys.stderr)
        return None


def check_stats(st, spans, N: int, keep: int, L: int, lp: int, K: int, T: int) -> dict:
    """The last prefill's FastV stats against the keep rule; kept tokens must lie inside the visual spans."""
    expected_cache = [L] * K + [lp] * (T - K)
    visual = torch.zeros(L, dtype=torch.bool)
    for start, n in spans:
        visual[start:start + n] = True
    kept = st.kept_visual_mask
    kept = kept[0].cpu() if kept is not None else None
    got = {"num_visual": list(st.num_visual), "keep_count": list(st.keep_count),
           "pruned_length": list(st.pruned_length), "cache_lengths": st.cache_lengths,
           "scoring_layer": st.scoring_layer,
           "kept_visual_tokens": None if kept is None else int(kept.sum()),
           "kept_outside_visual_spans": None if kept is None else int((kept & ~visual).sum()),
           "kept_per_span": None if kept is None else [int(kept[s:s + n].sum()) for s, n in spans]}
    ok = (got["num_visual"] == [N] and got["keep_count"] == [keep] and got["pruned_length"] == [lp] and got["cache_lengths"] == expected_cache
          and got["scoring_layer"] == K - 1 and got["kept_visual_tokens"] == keep
          and got["kept_outside_visual_spans"] == 0)
    return {"ok": ok, "got": got, "expected": {"keep_count": [keep], "pruned_length": [lp],
                                              "cache_lengths": expected_cache, "scoring_layer": K - 1,
                                              "kept_visual_tokens": keep, "kept_outside_visual_spans": 0,
                                              "num_visual": [N]}}


# ------------------------------------------------------------------------------------------------ run
def run_preset(preset: str, args, device: torch.device, dtype: torch.dtype, log: Log) -> dict:
    K = args.k
    config = build_config(preset, args.attn)
    tcfg = text_config_of(config)
    T = tcfg.num_hidden_layers
    if not 1 <= K < T:
        raise SystemExit(f"--k must be in [1, {T - 1}] for {preset} ({T} layers), got {K}")
    t0 = time.perf_counter()
    model = build_model(preset, config, device, dtype, args.seed)
    synchronize(device)
    n_params = sum(p.numel() for p in model.parameters())
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    bench = Bench(model, args, device)
    text_params = sum(p.numel() for p in bench.text_model.parameters())
    log(f"{preset}: {type(model).__name__} ({type(bench.text_model).__name__}), {n_params / 1e9:.2f}B params "
        f"({weights_gib:.2f} GiB {args.dtype}), attn={args.attn}, built in {time.perf_counter() - t0:.1f}s")
    gen = torch.Generator().manual_seed(args.seed)
    shapes = []
    with torch.inference_mode():
        for name in args.prompts:
            prompt = build_prompt(preset, name, model, config, args, device, gen)
            L, N = prompt["L"], prompt["N"]
            tag = f"{preset}/{name}"
            full = sliced_inputs(prompt, None)
            log(f"{tag}: L={L}, N={N} visual tokens ({prompt['layout']}); vanilla TTFT")
            t_van = bench.ttft(full)
            out = bench.prefill(full)
            logits_finite = bool(torch.isfinite(out.logits.float()).all())
            del out
            mem_van = bench.memory(full)
            shape = {k: v for k, v in prompt.items() if k not in ("inputs", "position_ids")}
            shape.update(prefix=args.prefix, text=args.text, logits_finite=logits_finite,
                         vanilla={"ttft": t_van.as_dict(), "memory": mem_van.as_dict() if mem_van else None})
            runs = []
            for R in args.ratios:
                keep = keep_count(N, R)
                lp = L - (N - keep)
                run_ = {"ratio": R, "k": K, "keep": keep, "Lp": lp}
                h = me.apply(model, "fastv", k=K, ratio=R, **prompt["fastv_kwargs"])
                try:
                    log(f"{tag}: FastV K={K} R={R} TTFT (keep {keep}, L'={lp})")
                    t_fv = bench.ttft(full)
                    check = check_stats(h.stats, prompt["spans"], N, keep, L, lp, K, T)
                    mem_fv = bench.memory(full)
                finally:
                    h.remove()
                if not check["ok"]:
                    log(f"WARNING {tag} R={R}: FastV stats {check['got']} != expected {check['expected']}")
                t_lp = None
                if not args.no_interp:
                    log(f"{tag}: vanilla TTFT at L'={lp} (interpolated ideal)")
                    t_lp = bench.ttft(sliced_inputs(prompt, lp))
                log(f"{tag}: ideal shape R={R}: layers[:{K}]@{L} + layers[{K}:]@{lp} - shell@{lp}")
                ideal = bench.ideal(prompt, K, lp, t_van, t_lp)
                fl = flops_report(config, prompt["flops_prefix"], N, prompt["flops_text"], K, R)
                speedup = t_van.median_ms / t_fv.median_ms
                run_.update(ttft=t_fv.as_dict(), memory=mem_fv.as_dict() if mem_fv else None, stats_check=check,
                            ideal=ideal, flops=fl, speedup=speedup,
                            ideal_speedup=t_van.median_ms / ideal["direct_ms"],
                            overhead=t_fv.median_ms / ideal["direct_ms"] - 1.0,
                            overhead_vs_interp=(t_fv.median_ms / ideal["interp_ms"] - 1.0)
                            if ideal["interp_ms"] else None,
                            speedup_over_flops_exact=speedup * fl["exact_ratio"] if fl else None,
                            speedup_over_flops_eq5=speedup * fl["paper_eq5_ratio"] if fl else None)
                runs.append(run_)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            shape["fastv"] = runs
            shapes.append(shape)
            del prompt, full
    info = {"preset": preset, "name": PRESETS[preset]["name"], "class": type(model).__name__,
            "text_model_class": type(bench.text_model).__name__, "params": n_params, "text_model_params": text_params,
            "weights_gib": weights_gib, "num_layers": T, "hidden": tcfg.hidden_size,
            "intermediate": tcfg.intermediate_size, "heads": tcfg.num_attention_heads,
            "kv_heads": tcfg.num_key_value_heads, "vocab": tcfg.vocab_size, "attn_implementation": args.attn,
            "dtype": args.dtype, "mrope_section": PRESETS[preset].get("mrope_section"),
            "elapsed_s": time.perf_counter() - t0, "shapes": shapes}
    # free the model before the next preset is built
    del bench, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return info


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --preset tiny-... for a smoke run)")
    dtype = DTYPES[args.dtype]
    if device.type == "cpu" and args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    env = environment_info(device)
    log = Log()
    t_start = time.perf_counter()
    presets = [run_preset(p, args, device, dtype, log) for p in args.preset]
    return {"benchmark": "fastv_vlm", "env": env, "args": vars(args), "presets": presets,
            "elapsed_s": time.perf_counter() - t_start}


def all_checks_ok(result: dict) -> bool:
    return all(r["stats_check"]["ok"] and s["logits_finite"]
               for p in result["presets"] for s in p["shapes"] for r in s["fastv"])


# ------------------------------------------------------------------------------------------------ report
def _mem_cell(m: dict | None) -> str:
    return "n/a" if not m else f"{m['peak_gib']:.2f} (+{m['extra_gib']:.2f})"


def _t_cell(t: dict) -> str:
    return f"{t['median_ms']:.1f} [{t['p10_ms']:.1f}–{t['p90_ms']:.1f}]"


def _flops_cell(fl: dict | None) -> str:
    if not fl:
        return "n/a"
    return (f"{fl['paper_eq5_ratio']:.3f} / {fl['exact_ratio']:.3f} "
            f"({1 / fl['paper_eq5_ratio']:.2f}× / {1 / fl['exact_ratio']:.2f}×)")


COLUMNS = [("method", "method"), ("R", "R"), ("kept", "kept visual tokens"), ("Lp", "seq len L'"),
           ("ttft", "TTFT ms median [p10–p90]"), ("speedup", "speedup"),
           ("ideal", "ideal-shape TTFT ms (direct / interp.)"), ("ideal_speedup", "ideal speedup"),
           ("overhead", "overhead vs ideal"), ("flops", "FLOPs ratio Eq.5 / exact (= speedup it predicts)"),
           ("eff", "speedup ÷ exact-FLOPs speedup"), ("mem", "peak mem GiB (+ over weights)"),
           ("check", "FastV stats")]

SUMMARY_COLUMNS = [("model", "model"), ("prompt", "prompt"), ("L", "L"), ("N", "visual N"), ("R", "R"),
                   ("kept", "kept"), ("Lp", "L'"), ("van", "vanilla TTFT ms"), ("fv", "FastV TTFT ms"),
                   ("speedup", "measured speedup"), ("ideal_speedup", "ideal-shape speedup"),
                   ("eq5", "FLOPs speedup Eq.5"), ("exact", "FLOPs speedup exact"),
                   ("eff", "measured ÷ exact"), ("overhead", "overhead vs ideal")]


def shape_rows(s: dict) -> list[dict]:
    v = s["vanilla"]
    rows = [{"method": "vanilla", "R": "–", "kept": f"{s['N']}", "Lp": s["L"], "ttft": _t_cell(v["ttft"]),
             "speedup": "1.00×", "ideal": "–", "ideal_speedup": "–", "overhead": "–", "flops": "1.000 / 1.000",
             "eff": "–", "mem": _mem_cell(v["memory"]), "check": "logits finite" if s["logits_finite"] else "NaN/inf!"}]
    for r in s["fastv"]:
        ideal = r["ideal"]
        interp = f"{ideal['interp_ms']:.1f}" if ideal["interp_ms"] is not None else "n/a"
        eff = r["speedup_over_flops_exact"]
        rows.append({"method": f"FastV K={r['k']}", "R": f"{r['ratio']:g}", "kept": f"{r['keep']}", "Lp": r["Lp"],
                     "ttft": _t_cell(r["ttft"]), "speedup": f"{r['speedup']:.2f}×",
                     "ideal": f"{ideal['direct_ms']:.1f} / {interp}", "ideal_speedup": f"{r['ideal_speedup']:.2f}×",
                     "overhead": f"{100 * r['overhead']:+.1f}%", "flops": _flops_cell(r["flops"]),
                     "eff": "n/a" if eff is None else f"{eff:.2f}", "mem": _mem_cell(r["memory"]),
                     "check": "OK" if r["stats_check"]["ok"] else "MISMATCH"})
    return rows


def summary_rows(result: dict) -> list[dict]:
    rows = []
    for p in result["presets"]:
        for s in p["shapes"]:
            for r in s["fastv"]:
                fl = r["flops"] or {}
                rows.append({"model": p["preset"], "prompt": s["name"], "L": s["L"], "N": s["N"],
                             "R": f"{r['ratio']:g}", "kept": r["keep"], "Lp": r["Lp"],
                             "van": f"{s['vanilla']['ttft']['median_ms']:.1f}",
                             "fv": f"{r['ttft']['median_ms']:.1f}", "speedup": f"{r['speedup']:.2f}×",
                             "ideal_speedup": f"{r['ideal_speedup']:.2f}×",
                             "eq5": f"{1 / fl['paper_eq5_ratio']:.2f}×" if fl else "n/a",
                             "exact": f"{1 / fl['exact_ratio']:.2f}×" if fl else "n/a",
                             "eff": f"{r['speedup_over_flops_exact']:.2f}" if fl else "n/a",
                             "overhead": f"{100 * r['overhead']:+.1f}%"})
    return rows


def command_line() -> str:
    parts = [a if (a and all(c.isalnum() or c in "-_./=:" for c in a)) else repr(a) for a in sys.argv[1:]]
    return "PYTHONPATH=src python3 benchmarks/vlm/bench_vlm.py " + " ".join(parts)


def render_markdown(result: dict) -> str:
    env, a = result["env"], result["args"]
    clock = "CUDA events" if env.get("gpu") else "host clock"
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_threads')} threads)"
    lines = [f"## FastV on 7B VLM language models (random weights), {a['dtype']}, attn={a['attn']}, batch 1", "",
             f"- device: {dev}; torch {env['torch']} (CUDA {env.get('torch_cuda')}), transformers "
             f"{env.get('transformers')}, python {env['python']}; {env['time_utc']}",
             f"- command: `{command_line()}`",
             "- TTFT = LLM prefill with `use_cache=True, logits_to_keep=1` (vision tower and projector excluded: "
             f"identical in both arms); {a['warmup']} warm-up + ≥{a['repeats']} timed calls "
             f"(≥{a['min_time']:g} s per measurement, {clock})",
             "- ideal shape = unmodified model, layers[:K] at L + layers[K:] at L' − one embeddings/RoPE/norm/head "
             "shell at L' (direct); interp. = K/T·t(L) + (T−K)/T·t(L'); overhead = FastV TTFT / ideal(direct) − 1",
             "- FLOPs ratio = pruned / baseline (paper Eq. 5 with n = tokens up to the last visual token / exact "
             "prefill incl. all text, SwiGLU, GQA, causal attention, LM head); in brackets the speedup it predicts; "
             "speedup ÷ exact-FLOPs speedup = measured speedup × exact ratio (1.00 = the FLOPs promise is met)",
             "- FastV stats: kept count, pruned length and per-layer cache lengths (K layers at L, the rest at L') "
             "checked against the keep rule after the timed prefills", ""]
    lines += ["### Summary", "", markdown_table(summary_rows(result), SUMMARY_COLUMNS), ""]
    for p in result["presets"]:
        lines.append(f"### {p['preset']}: {p['name']} — `{p['class']}` / `{p['text_model_class']}`, "
                     f"{p['text_model_params'] / 1e9:.2f}B text-model params, {p['num_layers']} layers, hidden "
                     f"{p['hidden']}, MLP {p['intermediate']}, {p['heads']} heads / {p['kv_heads']} KV heads, vocab "
                     f"{p['vocab']}" + (f", M-RoPE {p['mrope_section']}" if p.get("mrope_section") else ""))
        lines.append("")
        for s in p["shapes"]:
            lines.append(f"#### {s['name']}: {s['what']} = {s['N']} visual tokens, L = {s['L']} "
                         f"({s['layout']}); FastV visual tokens: {s['visual_source']}")
            lines.append("")
            lines.append(markdown_table(shape_rows(s), COLUMNS))
            lines.append("")
        lines.append(f"{p['preset']}: {p['elapsed_s']:.1f} s (build + all measurements).")
        lines.append("")
    ok = all_checks_ok(result)
    lines.append(f"FastV stats checks: {'all OK' if ok else '**MISMATCH** (see results.json stats_check)'}. "
                 f"Total benchmark time: {result['elapsed_s']:.1f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    md = render_markdown(result)
    print(md)
    write_outputs(result, md, args.out, args.markdown)
    if not all_checks_ok(result):
        print("FAILED: FastV stats or logits check (see the tables)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
