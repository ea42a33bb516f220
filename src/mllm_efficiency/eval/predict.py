"""`mllm-eff predict`: one image + one question -> one answer, with the efficiency numbers of that generation.

    from mllm_efficiency.eval.predict import predict
    result = predict("scene.png", "What color is the shape in the center?", method="fastv", ratio=0.75)
    result["answer"], result["kept_visual_tokens"], result["prefill_ms"], result["kv_bytes"]

The model (default: the embedded `shapes-vlm`) is loaded by `eval.vlm.load_vlm`, the prompt is built by
`eval.vlm.chat_prompt` exactly as the lmms-eval plugin builds it (the processor's chat template, one image), and
generation is greedy through `mllm_efficiency.generate` (`fast="auto"`: the fast path where it applies, eager on
CPU; else `model.generate`). Every argument is checked before the model is loaded (`ConfigError` naming it).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .methods import MethodChain, parse_chain, split_names

DEFAULT_MODEL = "shapes-vlm"
DEFAULT_MAX_NEW_TOKENS = 16


def open_image(image: Any):
    """An RGB PIL image from a path (or a PIL image); `ConfigError` naming --image for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(str(image)).expanduser()
    if not path.exists():
        raise ConfigError(f"--image: no such file {str(image)!r}")
    if not path.is_file():
        raise ConfigError(f"--image: {str(image)!r} is not a file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(f"--image: cannot read {str(image)!r} as an image ({e})") from None


def check_args(image: Any, question: str, model: str = DEFAULT_MODEL, method: str | None = None,
               ratio: float | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               params: dict | None = None):
    """(RGB image, method chain) after every check that needs no model; raises `ConfigError` naming the argument."""
    if not isinstance(question, str) or not question.strip():
        raise ConfigError("--question: must be a non-empty text")
    if ratio is not None:
        if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
            raise ConfigError(f"--ratio: must be in [0, 1) (fraction of visual tokens removed), got {ratio!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be an integer >= 1, got {max_new_tokens!r}")
    from .runner import check_model

    try:
        check_model(str(model))
    except ConfigError as e:
        raise ConfigError(f"--model: {e}") from None
    try:
        names = split_names(method)
    except ConfigError as e:
        raise ConfigError(f"--method: {str(e).removeprefix('method: ')}") from None
    if ratio is not None and not names:
        raise ConfigError("--ratio: needs a method (--method NAME); vanilla removes nothing")
    params = dict(params or {})
    try:
        chain = parse_chain(method, params)
    except ConfigError as e:
        raise ConfigError(f"--method: {e}") from None
    if ratio is not None:
        try:
            chain = parse_chain(method, {**params, "ratio": float(ratio)})
        except ConfigError as e:
            raise ConfigError(f"--ratio: {e}") from None
    return open_image(image), chain


def _device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def predict(image: Any, question: str, model: str = DEFAULT_MODEL, method: str | None = None,
            ratio: float | None = None, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, device: str | None = None,
            dtype: Any = None, fast: Any = "auto", params: dict | None = None, loaded: tuple | None = None) -> dict:
    """Answer `question` about `image` (a path or a PIL image) with `method` (None / "vanilla" = no method; chains
    as "fastv+snapkv") at `ratio` (fraction removed; None = each method's default). `loaded`: an already loaded
    (model, processor) to use instead of loading `model`. Returns the answer and its efficiency numbers (see
    `format_result`); the method is removed from the model before returning."""
    import torch

    from ..fast import generate, session_for
    from . import efficiency
    from .vlm import chat_prompt, load_vlm, parse_dtype

    img, chain = check_args(image, question, model, method, ratio, max_new_tokens, params)
    t0 = time.perf_counter()
    dev = _device(device)
    if loaded is None:
        vlm, processor = load_vlm(str(model), parse_dtype(dtype))
        vlm = vlm.to(dev)
    else:
        vlm, processor = loaded
        dev = str(next(vlm.parameters()).device)
    load_s = time.perf_counter() - t0
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    inputs = dict(processor(text=[chat_prompt(processor, question, 1)], images=[img], return_tensors="pt"))
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
    handles = chain.apply(vlm)
    try:
        return _run(vlm, tokenizer, chain, handles, inputs, max_new_tokens, fast, dev, model, ratio, load_s,
                    generate, session_for, efficiency)
    finally:
        for h in reversed(handles):
            h.remove()


def _run(vlm, tokenizer, chain: MethodChain, handles, inputs, max_new_tokens, fast, dev, model, ratio, load_s,
         generate, session_for, efficiency) -> dict:
    import torch

    from ..core.attachments import output_cache

    session = session_for(vlm)
    before = (session.last_plan, getattr(session.last_plan, "runs", 0))
    clock = efficiency.StepClock(dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        sequences = generate(vlm, fast=fast, max_new_tokens=max_new_tokens, streamer=clock, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, **inputs)
    efficiency.synchronize(dev)
    generate_s = time.perf_counter() - t0
    output, sequences = (None, sequences) if isinstance(sequences, torch.Tensor) else (sequences,
                                                                                        sequences.sequences)
    prompt_len = inputs["input_ids"].shape[1]
    new = sequences[0, prompt_len:]
    eos = tokenizer.eos_token_id
    n_gen = int(new.shape[0])
    if eos is not None and bool((new == eos).any()):
        n_gen = int((new == eos).nonzero()[0, 0]) + 1
    answer = tokenizer.decode(new[:n_gen], skip_special_tokens=True).strip()
    plan = session.last_plan
    ran_fast = plan is not None and (plan is not before[0] or plan.runs != before[1])
    image_id = getattr(vlm.config, "image_token_id", None)
    placeholders = int((inputs["input_ids"][0] == image_id).sum()) if image_id is not None else 0
    kept, _, visual = efficiency.kept_prompt_tokens(handles, prompt_len)
    visual = visual if visual is not None else placeholders
    if not handles:
        kept_visual = visual
    else:
        kept_visual = visual - (prompt_len - kept) if any(_records_keep(h) for h in handles) else None
    if ran_fast:
        kv_tokens, kv_bytes = efficiency.slot_kv(plan, 0, n_gen)
        path = f"fast-{plan.path}"
    else:
        kv_tokens, kv_bytes = efficiency.cache_size(output_cache(output))  # model.generate's cache at the end
        path = "stock"
    return {
        "answer": answer, "model": str(model), "method": chain.label, "method_params": [dict(c) for c in chain.configs],
        "ratio": ratio, "device": dev, "path": path,
        "prompt_tokens": prompt_len, "visual_tokens": visual, "kept_visual_tokens": kept_visual,
        "kept_tokens": kept, "generated_tokens": n_gen, "prefill_ms": clock.prefill_ms,
        "kv_bytes": kv_bytes, "kv_tokens": kv_tokens, "load_s": load_s, "generate_s": generate_s,
    }


def _records_keep(handle) -> bool:
    st = getattr(handle, "stats", None)
    return bool(getattr(st, "num_visual", None)) and bool(getattr(st, "keep_count", None))


def format_result(result: dict) -> str:
    """The answer line and one line of numbers."""
    if result["kept_visual_tokens"] is not None:
        kept = f"kept visual tokens {result['kept_visual_tokens']}/{result['visual_tokens']}"
    else:
        kept = f"visual tokens {result['visual_tokens']} (kept count not recorded by {result['method']})"
    prefill = "-" if result["prefill_ms"] is None else f"{result['prefill_ms']:.1f} ms"
    kv = "-" if result["kv_bytes"] is None else f"{result['kv_bytes']} B ({result['kv_bytes'] / 1024:.1f} KiB)"
    ratio = "" if result["ratio"] is None else f" R={result['ratio']:g}"
    return (f"answer: {result['answer']}\n"
            f"{result['model']}, {result['method']}{ratio} on {result['device']} ({result['path']}): "
            f"{kept}, prefill {prefill}, KV {kv}, "
            f"{result['generated_tokens']} tokens generated")
