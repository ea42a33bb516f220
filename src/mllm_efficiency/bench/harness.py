"""`mllm-eff bench`: every method on one model and one prompt shape, all measured in one process.

For each entry (vanilla, or methods chained with '+', applied with `mllm_efficiency.apply`):
  vision     the vision encoder(s) alone on the prompt's pixels (VLMs with images or frames)
  ttft       `model(**inputs, use_cache=True, logits_to_keep=1)`: vision + LLM prefill + first token's logits;
             `llm_prefill_ms` = ttft - vision
  probe      one more prefill, untimed, with forward pre-hooks recording the tokens each decoder layer processes
             (theoretical prefill FLOPs from those lengths), the cache it leaves (stored KV bytes, per-layer
             lengths), its peak memory, and the first token's logits (compared with vanilla's)
  decode     greedy single-token steps on that cache: `hf` = the model's forward with the cache, `fast` =
             `mllm_efficiency.fast.FastDecoder` (static buffers, CUDA graph on GPU); warm-up steps, then every
             timed step has its own CUDA events (host clock on CPU), median and p10-p90; steady memory = allocated
             at the end of the loop (weights + cache), peak = the allocator's peak over prefill and decode
  roofline   decode step lower bound = (decoder weight bytes + stored KV bytes) / bandwidth, the bandwidth
             measured in the same run by a large device copy; measured / bound
Speedups and FLOPs ratios are vanilla / entry (vanilla is measured first when listed).
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.attachments import cache_kwarg, output_cache
from ..errors import ConfigError
from .prompts import Prompt, PromptShape, build_prompt
from .presets import PRESETS, build_preset
from .roofline import (host_launch_us, kv_bytes, measure_bandwidth, roofline_ms, stored_lengths, weight_bytes,
                       weight_bytes_read)
from .specs import BenchEntry, parse_entries
from .timing import TimingResult, environment_info, synchronize, time_cuda

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
DECODE_BACKENDS = ("hf", "fast", "both", "e2e", "none")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    model: str  # preset name, zoo alias, HF directory or .gguf file
    entries: tuple[str, ...] = ("vanilla",)
    shape: PromptShape = PromptShape()
    decode: str = "hf"
    new_tokens: int = 32  # timed decode steps per backend
    decode_warmup: int = 4
    warmup: int = 2
    repeats: int = 5
    device: str | None = None
    dtype: str | None = None  # default bf16 on CUDA, fp32 on CPU
    attn: str = "sdpa"
    seed: int = 0
    bandwidth_mib: int | None = None
    keep_going: bool = True  # record a failing entry's error and go on

    def __post_init__(self) -> None:
        if self.decode not in DECODE_BACKENDS:
            raise ConfigError(f"decode must be one of {list(DECODE_BACKENDS)}, got {self.decode!r}")
        for name, low in (("new_tokens", 1), ("decode_warmup", 0), ("warmup", 0), ("repeats", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not self.entries:
            raise ConfigError("entries must list at least one method entry (e.g. 'vanilla')")

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """A rich progress bar when `rich` is installed and stderr is a terminal; plain timestamped lines otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self.t0 = time.perf_counter()
        self.enabled = enabled
        self._bar = self._task = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

                self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                                         "{task.total}"), TimeElapsedColumn(), transient=False)
                self._bar.start()
                self._task = self._bar.add_task("bench", total=total)
            except ImportError:
                self._bar = None

    def log(self, msg: str, advance: int = 0) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, description=msg, advance=advance)
        else:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ------------------------------------------------------------------------------------------------ model loading
def load_model(name: str, device: torch.device, dtype: torch.dtype, attn: str, tokens_per_image: int | None,
               seed: int):
    """(model, source description): a size preset with random weights, a zoo alias, a .gguf file or an HF dir."""
    if name in PRESETS:
        return build_preset(name, device, dtype, attn, tokens_per_image, seed), f"preset {name} (random weights)"
    from ..zoo import ALIASES, load_model as zoo_load

    path = Path(name)
    if name in ALIASES or path.suffix == ".gguf":
        model, _ = zoo_load(name, dtype=dtype, device=device, attn_implementation=attn)
        return model.eval(), f"zoo {name}"
    if path.is_dir():
        import transformers as T

        cfg = T.AutoConfig.from_pretrained(path)
        auto = T.AutoModelForImageTextToText if getattr(cfg, "vision_config", None) is not None \
            else T.AutoModelForCausalLM
        model = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        return model.to(device).eval(), f"local {path}"
    raise ConfigError(f"model must be a preset ({sorted(PRESETS)}), a zoo alias ({sorted(ALIASES)}), a .gguf "
                      f"file or a Hugging Face model directory; got {name!r}")


# ------------------------------------------------------------------------------------------------ one entry
class LayerLengthProbe:
    """Forward pre-hooks on the decoder layers recording the sequence length each one processes."""

    def __init__(self, layers):
        self.lengths: list[int] = [0] * len(layers)
        self._handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            self.lengths[i] = int(h.shape[1])
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _stats_dict(handle) -> dict:
    st = getattr(handle, "stats", None)
    out: dict = {}
    for key in ("keep_count", "num_visual", "pruned_length", "cache_lengths", "kept_fraction", "stored"):
        v = getattr(st, key, None)
        if v is not None and not isinstance(v, torch.Tensor):
            out[key] = list(v) if isinstance(v, (list, tuple)) else v
    return out


class StepClock:
    """Per-step times of a loop: CUDA events recorded around every step (one synchronisation at the end, so
    steps queue back to back as in real decoding) or the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._events: list = []
        self._host: list[float] = []

    def time(self, fn: Callable[[], Any]) -> Any:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = fn()
        self._host.append((time.perf_counter() - t0) * 1e3)
        return out

    def result(self) -> TimingResult:
        if self.cuda:
            synchronize(self.device)
            return TimingResult.from_samples([s.elapsed_time(e) for s, e in self._events], "cuda_event")
        return TimingResult.from_samples(self._host, "perf_counter")


class EntryRunner:
    def __init__(self, model, prompt: Prompt, settings: BenchSettings, device: torch.device, bandwidth: float):
        from ..adapters import get_adapter
        from ..flops import LayerShape

        self.model, self.prompt, self.s, self.device, self.bw = model, prompt, settings, device, bandwidth
        self.adapter = get_adapter(model)
        self.shape = LayerShape.from_model(model)
        self.ck = cache_kwarg(model)
        self.w_read = weight_bytes_read(model)

    def forward(self):
        return self.model(**self.prompt.inputs, use_cache=True, logits_to_keep=1)

    def run(self, entry: BenchEntry, progress: Progress) -> dict:
        import mllm_efficiency as me
        from .flops_model import decode_step_flops, prefill_flops

        s, dev, p = self.s, self.device, self.prompt
        res: dict = {"entry": entry.label, "methods": [dataclasses.asdict(m) for m in entry.methods]}
        handles = []
        try:
            for m in entry.methods:
                handles.append(me.apply(self.model, m.name, **m.params))
            with torch.inference_mode():
                if p.vision is not None:
                    progress.log(f"{entry.label}: vision encoder")
                    res["vision"] = time_cuda(p.vision, warmup=s.warmup, repeats=s.repeats, device=dev).as_dict()
                progress.log(f"{entry.label}: prefill (TTFT)")
                ttft = time_cuda(self.forward, warmup=s.warmup, repeats=s.repeats, device=dev)
                res["ttft"] = ttft.as_dict()
                vision_ms = res["vision"]["median_ms"] if "vision" in res else 0.0
                res["llm_prefill_ms"] = max(ttft.median_ms - vision_ms, 0.0)
                self._free()
                probe = LayerLengthProbe(self.adapter.layers)
                base = self._reset_peak()
                try:
                    out = self.forward()
                finally:
                    probe.remove()
                res["prefill_peak_bytes"] = self._peak()
                res["baseline_bytes"] = base
                cache = output_cache(out, required=True)
                logits = out.logits[:, -1]
                del out
                res["processed_lengths"] = probe.lengths
                res["kv_bytes"] = kv_bytes(cache)
                res["stored_lengths"] = stored_lengths(cache)
                res["prefill_flops"] = prefill_flops(self.shape, probe.lengths, p.batch)
                res["decode_step_flops"] = decode_step_flops(self.shape, [n + 1 for n in res["stored_lengths"]],
                                                             p.batch)
                res["first_logits"] = logits.float().cpu()
                res["stats"] = {h.name: _stats_dict(h) for h in handles}
                if s.decode in ("hf", "both"):
                    progress.log(f"{entry.label}: decode (hf)")
                    res["decode_hf"] = self._decode_hf(cache, logits)
                del cache, logits
                self._free()
                if s.decode in ("fast", "both"):
                    progress.log(f"{entry.label}: decode (fast)")
                    try:
                        res["decode_fast"] = self._decode_fast()
                    except Exception as e:  # noqa: BLE001 - keep the prefill and hf results of this entry
                        if not s.keep_going:
                            raise
                        res["decode_fast"] = {"error": f"{type(e).__name__}: {e}"}
                        progress.log(f"{entry.label}: fast decode FAILED {res['decode_fast']['error']}")
                        self._free()
                if s.decode == "e2e":
                    progress.log(f"{entry.label}: end to end (stock generate, mllm_efficiency.generate)")
                    res.update(self._end_to_end())
                if s.decode == "both" and "error" not in res["decode_fast"]:
                    hf, fast = res["decode_hf"], res["decode_fast"]
                    res["fast_over_hf_speedup"] = hf["step"]["median_ms"] / fast["step"]["median_ms"]
        finally:
            for h in reversed(handles):
                h.remove()
            self._free()
        return res

    # ------------------------------------------------------------------------ decode backends
    def _positions(self, start: int):
        """Position ids (B, 1) of the token at logical position `start` (M-RoPE rows for Qwen2-VL)."""
        B = self.prompt.batch
        if self.adapter.uses_mrope:
            return self.adapter.continuation_position_ids(start, 1, B, self.device)
        return torch.full((B, 1), start, dtype=torch.long, device=self.device)

    def _decode_hf(self, cache, logits) -> dict:
        s, L = self.s, self.prompt.length
        n_total = s.decode_warmup + s.new_tokens
        positions = [self._positions(L + i) for i in range(n_total)]  # built up front: no host work per step
        tok = logits.argmax(-1, keepdim=True)
        tokens = [tok]
        clock = StepClock(self.device)
        kv_start = None

        def step(i, t):
            out = self.model(input_ids=t, position_ids=positions[i], use_cache=True, logits_to_keep=1,
                             **{self.ck: cache})
            return out.logits[:, -1].argmax(-1, keepdim=True)

        for i in range(n_total):
            if i == s.decode_warmup:
                synchronize(self.device)
                kv_start = kv_bytes(cache)
            tok = clock.time(lambda: step(i, tok)) if i >= s.decode_warmup else step(i, tok)
            tokens.append(tok)
        timing = clock.result()
        kv_end = kv_bytes(cache)
        return self._decode_result(timing, kv_start, kv_end, torch.cat(tokens, 1), stored_lengths(cache))

    def _decode_fast(self) -> dict:
        try:
            from ..fast import FastDecoder
        except ImportError as e:
            raise RuntimeError("--decode fast needs mllm_efficiency.fast.FastDecoder, which is not available in "
                               f"this install ({e}); use --decode hf") from None
        s = self.s
        n_total = s.decode_warmup + s.new_tokens
        base = self._reset_peak()
        dec = FastDecoder(self.model, max_new_tokens=n_total, cuda_graph=True)
        try:
            logits = dec.prefill(**self.prompt.inputs)
            kv_prefill = int(dec.kv_bytes)
            tok = logits.argmax(-1, keepdim=True)
            tokens = [tok]
            clock = StepClock(self.device)
            for i in range(n_total):
                if i >= s.decode_warmup:
                    tok = clock.time(lambda: dec.step(tok).argmax(-1, keepdim=True))
                else:
                    tok = dec.step(tok).argmax(-1, keepdim=True)
                tokens.append(tok)
            timing = clock.result()
            per_token = self._kv_bytes_per_token()
            kv_start = kv_prefill + per_token * s.decode_warmup
            kv_end = kv_prefill + per_token * n_total
            lengths = list(getattr(dec, "stored_lengths", []) or [])
            res = self._decode_result(timing, kv_start, kv_end, torch.cat(tokens, 1), lengths, base)
            res["kv_bytes_prefill"] = kv_prefill
            return res
        finally:
            dec.close()

    def _end_to_end(self) -> dict:
        """Prompt -> `new_tokens` greedy tokens as a user runs it (vision tower included): the model's own
        `generate` and `mllm_efficiency.generate` (the fast path), each generating exactly `new_tokens`."""
        import mllm_efficiency as me

        s, inputs, n = self.s, self.prompt.inputs, self.s.new_tokens
        config = self.model.generation_config
        saved = (config.eos_token_id, config.pad_token_id)
        config.eos_token_id, config.pad_token_id = None, 0  # every arm generates exactly n tokens
        try:
            stock = time_cuda(lambda: self.model.generate(**inputs, max_new_tokens=n, do_sample=False),
                              warmup=1, repeats=s.repeats, device=self.device)
            fast = time_cuda(lambda: me.generate(self.model, **inputs, max_new_tokens=n, fast=True),
                             warmup=2, repeats=s.repeats, device=self.device)
        finally:
            config.eos_token_id, config.pad_token_id = saved
            from ..fast import release

            release(self.model)
        return {"e2e_hf": stock.as_dict(), "e2e_fast": fast.as_dict(),
                "e2e_fast_over_hf": stock.median_ms / fast.median_ms}

    def _kv_bytes_per_token(self) -> int:
        sh = self.shape
        elem = torch.finfo(self.s.resolved_dtype()).bits // 8
        return 2 * sh.num_layers * sh.num_kv_heads * sh.head_dim * elem * self.prompt.batch

    def _decode_result(self, timing: TimingResult, kv_start, kv_end, tokens, lengths, base=None) -> dict:
        B = self.prompt.batch
        kv_mid = (kv_start + kv_end) / 2
        bound = roofline_ms(self.w_read, kv_mid, self.bw)
        res = {"step": timing.as_dict(), "tokens_per_s": B * 1e3 / timing.median_ms,
               "kv_bytes_mid": kv_mid, "roofline_ms": bound, "measured_over_roofline": timing.median_ms / bound,
               "tokens": tokens.cpu(), "stored_lengths_after": lengths,
               "steady_bytes": self._allocated(), "peak_bytes": self._peak()}
        if base is not None:
            res["baseline_bytes"] = base
        return res

    # ------------------------------------------------------------------------ memory
    def _reset_peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def _peak(self) -> int | None:
        if self.device.type != "cuda":
            return None
        synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def _allocated(self) -> int | None:
        if self.device.type != "cuda":
            return None
        synchronize(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the run
def run_bench(settings: BenchSettings, progress: bool = True, model=None) -> dict:
    """Measure every entry of `settings` on one model and prompt; returns a JSON-ready result dict (call
    :func:`mllm_efficiency.bench.report.jsonable` before dumping; tensors are kept for in-process checks).
    `model` skips loading (the settings' model name is then only a label)."""
    entries = parse_entries(settings.entries)  # every entry is validated before the model is built
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available")
    n_entries = len(entries)
    bar = Progress(total=n_entries + 2, enabled=progress)
    t0 = time.perf_counter()
    try:
        shape = settings.shape
        source = "in-process model"
        if model is None:
            from .presets import PRESETS

            tpi = shape.tokens_per_image
            if tpi is None and settings.model in PRESETS and PRESETS[settings.model].is_vlm:
                tpi = PRESETS[settings.model].tokens_per_image
            shape = dataclasses.replace(shape, tokens_per_image=tpi)
            bar.log(f"building {settings.model} on {device} ({str(dtype).replace('torch.', '')})")
            model, source = load_model(settings.model, device, dtype, settings.attn, tpi, settings.seed)
        prompt = build_prompt(model, shape, device, dtype, seed=settings.seed)
        bar.log(f"prompt: {prompt.length} tokens per row ({prompt.visual_tokens} visual) x {prompt.batch}", advance=1)
        bw = measure_bandwidth(device, settings.bandwidth_mib)
        bw["host_launch_us"] = host_launch_us(device)
        bar.log(f"bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s", advance=1)
        runner = EntryRunner(model, prompt, settings, device, bw["bytes_per_s"])
        rows = []
        for entry in entries:
            try:
                rows.append(runner.run(entry, bar))
            except Exception as e:  # noqa: BLE001 - one failing method must not lose the others' results
                if not settings.keep_going:
                    raise
                rows.append({"entry": entry.label, "error": f"{type(e).__name__}: {e}"})
                bar.log(f"{entry.label}: FAILED {type(e).__name__}: {e}")
            bar.log(f"{entry.label}: done", advance=1)
    finally:
        bar.close()
    _compare_with_vanilla(rows)
    return {
        "settings": {**dataclasses.asdict(settings), "shape": dataclasses.asdict(shape),
                     "device": str(device), "dtype": str(dtype).replace("torch.", "")},
        "model": {"source": source, "class": type(model).__name__, "weight_bytes": weight_bytes(model),
                  "decode_weight_bytes_read": runner.w_read, "layer_shape": dataclasses.asdict(runner.shape)},
        "prompt": {"length": prompt.length, "visual_tokens": prompt.visual_tokens, "batch": prompt.batch,
                   "shape": shape.describe()},
        "bandwidth": bw,
        "environment": environment_info(device),
        "wall_s": time.perf_counter() - t0,
        "entries": rows,
    }


def _compare_with_vanilla(rows: list[dict]) -> None:
    """Speedups and FLOPs ratios relative to the vanilla entry; first-token logits and greedy tokens compared."""
    van = next((r for r in rows if r["entry"] == "vanilla" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            continue
        if van is None:
            continue
        r["ttft_speedup"] = van["ttft"]["median_ms"] / r["ttft"]["median_ms"]
        if r.get("llm_prefill_ms") and van.get("llm_prefill_ms"):
            r["llm_prefill_speedup"] = van["llm_prefill_ms"] / r["llm_prefill_ms"]
        r["flops_ratio"] = van["prefill_flops"] / r["prefill_flops"]  # theoretical prefill speedup
        r["kv_reduction"] = 1.0 - r["kv_bytes"] / van["kv_bytes"] if van["kv_bytes"] else None
        r["first_logits_max_diff"] = float((r["first_logits"] - van["first_logits"]).abs().max())
        for key in ("decode_hf", "decode_fast"):
            if key in r and key in van and "error" not in r[key] and "error" not in van[key]:
                r[key]["speedup"] = van[key]["step"]["median_ms"] / r[key]["step"]["median_ms"]
                r[key]["tokens_equal_vanilla"] = bool(torch.equal(r[key]["tokens"], van[key]["tokens"]))
