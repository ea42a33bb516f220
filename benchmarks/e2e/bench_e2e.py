"""End-to-end speed as a user sees it: `model.generate` (stock) against `mllm_efficiency.generate` (fast path).

One run, one model (random weights, a preset's full size), every ratio against a baseline measured in the same
run. Sections:
  prefill   LLM prefill only (the text model + LM head on the merged embeddings; no vision tower):
            stock HF forward vs the fast path's graph replay, vanilla and the method; plus the graph-replayed
            prefill of a text prompt as long as the pruned sequence (the "ideal" pruned shape) to split the
            method's gap to its FLOPs ratio into GEMM efficiency at fewer rows and the method's own overhead
  e2e       prompt -> N greedy tokens, vision tower included: stock generate vs me.generate, vanilla and method
  logits    bf16 agreement: the fast path fed generate()'s tokens (teacher forcing); max |diff| of the logits
            relative to their spread (max - min), per step

  PYTHONPATH=src python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --out-dir benchmarks/e2e
  python benchmarks/e2e/bench_e2e.py --preset tiny-llava --device cpu --dtype fp32 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mllm_efficiency as me
from mllm_efficiency.bench.presets import PRESETS, build_preset
from mllm_efficiency.bench.prompts import PromptShape, build_prompt
from mllm_efficiency.bench.timing import environment_info, markdown_table, time_cuda
from mllm_efficiency.fast import release, session_for

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-1.5-7b", help=f"one of {sorted(PRESETS)} or tiny-llava")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--context", type=int, default=60, help="text tokens around the images")
    p.add_argument("--method", default="fastv")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--e2e", nargs="+", default=["1:32", "8:8"], help="IMAGES:NEW_TOKENS cells of the e2e section")
    p.add_argument("--sections", nargs="+", default=["prefill", "e2e", "logits"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="fast path with the decode step through torch.compile")
    p.add_argument("--out-dir", default=None)
    return p.parse_args(argv)


def method_kwargs(args) -> dict:
    return dict(k=args.k, ratio=args.ratio) if args.method == "fastv" else dict(ratio=args.ratio)


def build(args, device, dtype):
    if args.preset == "tiny-llava":
        from mllm_efficiency.testing import tiny

        return tiny.tiny_llava(num_layers=4).to(device, dtype), 16
    model = build_preset(args.preset, device, dtype)
    return model, PRESETS[args.preset].tokens_per_image


def prompt_for(model, images: int, tpi: int, args, device, dtype):
    if args.preset == "tiny-llava":
        from mllm_efficiency.testing import llava_prompt

        ids, pv = llava_prompt(num_images=images, tokens_per_image=tpi)
        return dict(input_ids=ids.to(device), pixel_values=pv.to(device, dtype))
    shape = PromptShape(context=args.context, images=images, tokens_per_image=tpi)
    return build_prompt(model, shape, device, dtype).inputs


def timed(fn, args, device):
    return time_cuda(fn, warmup=args.warmup, repeats=args.repeats, device=device, min_time_s=1.0, max_repeats=50)


# ----------------------------------------------------------------------------------------------- sections
def prefill_section(model, tpi, args, device, dtype) -> list[dict]:
    inputs = prompt_for(model, 1, tpi, args, device, dtype)
    session = session_for(model)
    text_model = model.model.language_model
    lm_head = model.lm_head
    embeds = model.model.get_input_embeddings()(inputs["input_ids"].clamp(max=text_model.config.vocab_size - 1))

    def stock():
        with torch.inference_mode():
            out = text_model(inputs_embeds=embeds, use_cache=True)
            return lm_head(out.last_hidden_state[:, -1])

    def fast_prefill():
        with torch.inference_mode():
            text = session._text_inputs(inputs)
            plan = session._plan_for(text, inputs["input_ids"], 1)
        return lambda: plan.prefill(text, inputs["input_ids"]), plan

    rows = []
    L = inputs["input_ids"].shape[1]
    t_stock = timed(stock, args, device)
    rows.append(dict(arm="stock HF vanilla", rows=L, ms=t_stock.median_ms))
    run, plan = fast_prefill()
    t_fast = timed(run, args, device)
    rows.append(dict(arm="fast vanilla", rows=L, ms=t_fast.median_ms, path=plan.path))
    with me.apply(model, args.method, **method_kwargs(args)) as h:
        run, plan = fast_prefill()
        t_method = timed(run, args, device)
        kept = plan.stored_lengths[-1]
        rows.append(dict(arm=f"fast {args.method} R={args.ratio}", rows=kept, ms=t_method.median_ms,
                         path=plan.path, eager_reason=plan.eager_reason, keep=getattr(h.stats, "keep_count", None)))
    # the ideal pruned shape: a prompt as long as the kept sequence, graph-replayed without any method
    short = dict(input_ids=inputs["input_ids"][:, :kept])
    short_text = None

    def ideal():
        nonlocal short_text
        with torch.inference_mode():
            text = {"inputs_embeds": embeds[:, :kept]}
            plan = session._plan_for(dict(text), short["input_ids"], 1)
            short_text = text
        return lambda: plan.prefill(text, short["input_ids"]), plan

    run, plan = ideal()
    t_short = timed(run, args, device)
    rows.append(dict(arm="fast vanilla, pruned length", rows=kept, ms=t_short.median_ms, path=plan.path))
    T = model.config.text_config.num_hidden_layers
    K = args.k
    ideal_ms = K / T * t_fast.median_ms + (T - K) / T * t_short.median_ms
    rows.append(dict(arm=f"ideal {args.method} (K/T·t(L) + (T-K)/T·t(L'))", rows=kept, ms=ideal_ms))
    for r in rows:
        r["vs stock vanilla"] = t_stock.median_ms / r["ms"]
        r["vs fast vanilla"] = t_fast.median_ms / r["ms"]
    return rows


def e2e_section(model, tpi, args, device, dtype) -> list[dict]:
    rows = []
    model.generation_config.eos_token_id = None  # every arm generates exactly N tokens
    model.generation_config.pad_token_id = 0
    for cell in args.e2e:
        images, new = (int(x) for x in cell.split(":"))
        inputs = prompt_for(model, images, tpi, args, device, dtype)

        def stock():
            with torch.inference_mode():
                return model.generate(**inputs, max_new_tokens=new, do_sample=False)

        def fast():
            return me.generate(model, **inputs, max_new_tokens=new, fast=True)

        base = {}
        for arm, fn, method in (("stock vanilla", stock, None), ("fast vanilla", fast, None),
                                (f"stock {args.method}", stock, args.method), (f"fast {args.method}", fast, args.method)):
            handle = me.apply(model, method, **method_kwargs(args)) if method else None
            try:
                out = fn()
                t = time_cuda(fn, warmup=2, repeats=max(3, args.repeats // 2), device=device)
            finally:
                if handle:
                    handle.remove()
            base[arm] = t.median_ms
            rows.append(dict(cell=f"{images}x{tpi}, {new} new", arm=arm, ms=t.median_ms, tokens=out.shape[1]))
        for r in rows[-4:]:
            r["vs stock vanilla"] = base["stock vanilla"] / r["ms"]
            r["vs fast vanilla"] = base["fast vanilla"] / r["ms"]
    return rows


def logits_section(model, tpi, args, device, dtype, steps: int = 16) -> list[dict]:
    rows = []
    model.generation_config.eos_token_id = None
    inputs = prompt_for(model, 1, tpi, args, device, dtype)
    for method in (None, args.method):
        handle = me.apply(model, method, **method_kwargs(args)) if method else None
        try:
            with torch.inference_mode():
                ref = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
                L = inputs["input_ids"].shape[1]
                forced = ref.sequences[:, L:]
                session = session_for(model)
                text = session._text_inputs(inputs)
                plan = session._plan_for(text, inputs["input_ids"], steps)
                for _ in range(3):  # eager, then captured, then replayed
                    got = [plan.prefill(text, inputs["input_ids"]).float().clone()]
                plan.start_decode(session._first_positions(text, plan), forced[:, :1])
                for t in range(1, steps):
                    got.append(plan.step().float().clone())
                    plan.step_ids.copy_(forced[:, t:t + 1])
            worst = 0.0
            for t, (g, r) in enumerate(zip(got, ref.logits)):
                r = r.float()
                worst = max(worst, float((g - r).abs().max() / (r.max() - r.min())))
            same = bool((torch.stack([g.argmax(-1) for g in got], 1) == forced).all())
            rows.append(dict(method=method or "vanilla", steps=steps, max_abs_diff_over_spread=worst,
                             argmax_equal=same, prefill_path=plan.path))
        finally:
            if handle:
                handle.remove()
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    t0 = time.time()
    model, tpi = build(args, device, dtype)
    result = {"command": "python3 " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "environment": environment_info(device), "preset": args.preset, "dtype": args.dtype,
              "method": args.method, "method_kwargs": method_kwargs(args), "compile": args.compile}
    sections = {"prefill": prefill_section, "e2e": e2e_section, "logits": logits_section}
    for name in args.sections:
        release(model)
        session_for(model, compile=args.compile)
        result[name] = sections[name](model, tpi, args, device, dtype)
        print(f"== {name}\n" + markdown_table(result[name], list(result[name][0].keys())), flush=True)
    result["seconds"] = time.time() - t0
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
        md = [f"# End to end: stock `model.generate` vs `mllm_efficiency.generate` ({args.preset}, {args.dtype})", "",
              f"- command: `{result['command']}`", f"- device: {result['environment']}", ""]
        for name in args.sections:
            md += [f"## {name}", "", markdown_table(result[name], list(result[name][0].keys())), ""]
        (out / "results.md").write_text("\n".join(md))
    return result


if __name__ == "__main__":
    main()
