"""lmms-eval model plugin `--model mllm_efficiency`: any supported HF VLM plus any method chain.

Registered from outside lmms-eval through the entry-point group ``lmms_eval.models`` (pyproject names
`mllm_efficiency.eval.lmms_main.manifests`), or in code with `register()`. Example:

    lmms-eval --model mllm_efficiency \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv+snapkv,fastv.k=2,ratio=0.5 \\
        --tasks textvqa_val --batch_size 1 --output_path results/

model_args: ``pretrained`` (a model directory, or ``shapes-vlm`` = the embedded default), ``method`` (``vanilla``
or names joined by ``+``), any method parameter (bare = every method having it, ``name.param`` = one method),
``attn_implementation``, ``device``, ``device_map``, ``dtype``, ``batch_size``, ``max_new_tokens``,
``conv_template`` (chatml / vicuna / plain; default: the processor's chat template), ``max_frames_num``,
``fast`` (``auto`` = `mllm_efficiency.generate`'s fast path on CUDA, ``true`` = on any device, ``false`` = stock
``model.generate``; greedy requests only, sampling always runs ``model.generate``),
``customized_config`` (a JSON/YAML file of method parameters), ``efficiency_log`` (a .jsonl path for the
per-sample efficiency numbers; a ``*.summary.json`` is written beside it; default: the environment variable
``MLLM_EFF_EFFICIENCY_LOG``, else only a one-line summary is printed).

`generate_until` returns lmms-eval ``GenerationResult``s with the prompt / generated token counts, so lmms-eval's
own ``efficiency`` block in the results JSON is filled too.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from ..errors import ConfigError
from . import efficiency
from .lmms_main import CLASS_PATH, MODEL_ID, register  # noqa: F401  (register: re-exported)
from .methods import parse_chain
from .vlm import (CONV_TEMPLATES, VICUNA_TEMPLATE, chat_prompt, load_vlm,  # noqa: F401  (re-exported)
                  parse_dtype)

try:  # lmms-eval >= 0.7: per-request token counts feed its own efficiency summary
    from lmms_eval.api.instance import GenerationResult, TokenCounts
except ImportError:  # older lmms-eval: plain strings
    GenerationResult = TokenCounts = None

MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)

_RESERVED = {"pretrained", "method", "device", "device_map", "dtype", "batch_size", "attn_implementation",
             "max_new_tokens", "conv_template", "max_frames_num", "customized_config", "efficiency_log",
             "trust_remote_code", "use_cache", "fast"}


def _fast_setting(value) -> str | bool:
    text = str(value).strip().lower()
    if text in ("auto",):
        return "auto"
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"fast must be auto, true or false; got {value!r}")


_slot_kv = efficiency.slot_kv  # the old private name


def _load_params_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"customized_config: no such file {path!r}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"customized_config: {path} must hold a mapping of method parameters")
    return data


_dtype = parse_dtype  # the old private name


class MLLMEfficiency(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "shapes-vlm", method: str = "vanilla", device: str | None = None,
                 device_map: str = "", dtype: str = "auto", batch_size: int | str = 1,
                 attn_implementation: str = "sdpa", max_new_tokens: int = 16, conv_template: str | None = None,
                 max_frames_num: int = 8, customized_config: str | None = None, efficiency_log: str | None = None,
                 trust_remote_code: bool = False, use_cache: bool = True, fast: str | bool = "auto",
                 **method_params: Any) -> None:
        super().__init__()
        from accelerate import Accelerator

        params = _load_params_file(customized_config) if customized_config else {}
        params.update(method_params)
        self.chain = parse_chain(str(method), params)  # bad method / parameter: fail before loading weights
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if conv_template is not None and conv_template not in CONV_TEMPLATES:
            raise ConfigError(f"conv_template must be one of {list(CONV_TEMPLATES)}, got {conv_template!r}")
        if int(max_frames_num) < 1:
            raise ConfigError(f"max_frames_num must be >= 1, got {max_frames_num}")
        self.conv_template, self.max_frames_num = conv_template, int(max_frames_num)
        self.fast_setting = _fast_setting(fast)
        self.max_new_tokens, self.use_cache = int(max_new_tokens), bool(use_cache)

        accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU launches: one rank per process
        self.accelerator = accelerator
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if accelerator.num_processes > 1:  # data parallel: one full model per process
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
            device_map = ""
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, processor = load_vlm(str(pretrained), _dtype(dtype), attn_implementation, device_map or None,
                                    trust_remote_code)
        if not device_map:
            model = model.to(self._device)
        self._model, self.processor = model, processor
        self._tokenizer = getattr(processor, "tokenizer", processor)
        self._tokenizer.padding_side = "left"
        if self._tokenizer.pad_token_id is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self.handles = self.chain.apply(model)
        self.fast = self.fast_setting is True or (self.fast_setting == "auto" and self._device.type == "cuda")
        self.efficiency_rows: list[dict] = []
        self.generate_seconds = 0.0  # wall time of generate_until (encoding + generation), for samples/s
        log = efficiency_log or os.environ.get("MLLM_EFF_EFFICIENCY_LOG")
        if log and self._world_size > 1:
            log = str(Path(log).with_suffix(f".rank{self._rank}.jsonl"))
        self.efficiency_log = Path(log) if log else None

    # ---------------------------------------------------------------- lmms-eval properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def eot_token_id(self):
        return self._tokenizer.eos_token_id

    # ---------------------------------------------------------------- prompts
    def _visuals(self, visuals) -> list:
        from PIL import Image

        flat = []
        for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
            if isinstance(v, (list, tuple)):
                flat.extend(self._visuals(v))
            elif isinstance(v, Image.Image):
                flat.append(v.convert("RGB"))
            elif isinstance(v, str):
                flat.extend(self._video_frames(v))
            else:
                raise TypeError(f"unsupported visual of type {type(v).__name__} (expected PIL images or a video path)")
        return flat

    def _video_frames(self, path: str) -> list:
        """A video file as up to max_frames_num uniformly sampled frames (PIL); needs the `av` package."""
        try:
            import av
        except ImportError as e:
            raise ImportError(f"reading the video {path} needs the `av` package (pip install av)") from e
        with av.open(path) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
        if not frames:
            raise ValueError(f"no frames decoded from {path}")
        n = min(self.max_frames_num, len(frames))
        idx = [round(i * (len(frames) - 1) / max(n - 1, 1)) for i in range(n)]
        return [frames[i] for i in idx]

    def build_prompt(self, context: str, num_images: int) -> str:
        return chat_prompt(self.processor, context, num_images, self.conv_template)

    # ---------------------------------------------------------------- generation
    def _encode(self, context: str, visuals: list) -> dict:
        """One sample's processor outputs (batch 1, on the CPU)."""
        kwargs = dict(text=[self.build_prompt(context, len(visuals))], return_tensors="pt")
        if visuals:
            kwargs["images"] = visuals
        return dict(self.processor(**kwargs))

    def _collate(self, encoded: list[dict]) -> dict:
        """One batch from samples of `_encode`: left-padded ids and mask when lengths differ, the other tensors
        concatenated (pixel values, image sizes, grids)."""
        lengths = {e["input_ids"].shape[1] for e in encoded}
        batch: dict = {}
        for key in encoded[0]:
            parts = [e[key] for e in encoded]
            if key in ("input_ids", "attention_mask", "mm_token_type_ids") and len(lengths) > 1:
                L = max(lengths)
                fill = self._tokenizer.pad_token_id if key == "input_ids" else 0
                parts = [torch.nn.functional.pad(t, (L - t.shape[1], 0), value=fill) for t in parts]
            batch[key] = torch.cat(parts, dim=0) if isinstance(parts[0], torch.Tensor) else parts
        return batch

    def _generate_batch(self, encoded: list[dict], gen_kwargs: dict) -> list[str]:
        """Texts of one batch; appends one efficiency row per sample to `efficiency_rows`."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        inputs = self._collate(encoded)
        inputs = {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        clock = efficiency.StepClock(self._device)
        sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        common = dict(max_new_tokens=max_new, streamer=clock, pad_token_id=self._tokenizer.pad_token_id, **sample)
        fast = self.fast and self.use_cache and temperature == 0
        with torch.inference_mode():
            if fast:
                from ..fast import generate, session_for

                sequences = generate(self._model, fast=True if self.fast_setting is True else "auto", **inputs,
                                     **common)
                plan = session_for(self._model).last_plan
                out, path = None, f"fast-{plan.path}" if plan is not None and plan.runs else "stock"
            else:
                out = self._model.generate(**inputs, use_cache=self.use_cache, return_dict_in_generate=True,
                                           **common)
                sequences, plan, path = out.sequences, None, "stock"
        prompt_len = inputs["input_ids"].shape[1]
        new = sequences[:, prompt_len:]
        image_id = getattr(self._model.config, "image_token_id", None)
        texts = []
        for row in range(new.shape[0]):
            tokens = new[row]
            eos = self._tokenizer.eos_token_id
            n_gen = int((tokens != self._tokenizer.pad_token_id).sum()) if eos == self._tokenizer.pad_token_id \
                else tokens.shape[0]
            text = self._tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            texts.append(text.strip())
            real = int(inputs["attention_mask"][row].sum()) if "attention_mask" in inputs else prompt_len
            n_visual = int((inputs["input_ids"][row] == image_id).sum()) if image_id is not None else 0
            kv = _slot_kv(plan, row, new.shape[1]) if plan is not None else None
            eff = efficiency.measure(self._model, self.handles, clock, out, real, n_visual, max(n_gen, 1), row,
                                     kv=kv)
            self.efficiency_rows.append({"method": self.chain.label, **eff.as_dict(), "batch": new.shape[0],
                                         "path": path, **self._ratio_fields(row)})
        return texts

    def generate_until(self, requests: list[Instance]) -> list:
        """Requests are encoded one by one and batched by prompt shape (same token count, same visual tensor
        shapes, same generation kwargs), so batches need no padding and the fast path reuses its graphs;
        results come back in request order."""
        import time

        from tqdm import tqdm

        t0 = time.perf_counter()
        args = [r.args for r in requests]
        groups: dict = {}
        encoded: list = []
        for i, (context, gen_kwargs, doc_to_visual, doc_id, task, split) in enumerate(args):
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals(doc_to_visual(doc)) if doc_to_visual is not None else []
            enc = self._encode(context, visuals)
            encoded.append(enc)
            shape = tuple((k, tuple(v.shape)) for k, v in sorted(enc.items()) if isinstance(v, torch.Tensor))
            groups.setdefault((shape, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        results: list = [None] * len(args)
        pbar = tqdm(total=len(args), disable=self._rank != 0, desc="mllm_efficiency")
        for members in groups.values():
            for start in range(0, len(members), self.batch_size_per_gpu):
                chunk = members[start:start + self.batch_size_per_gpu]
                texts = self._generate_batch([encoded[i] for i in chunk], args[chunk[0]][1])
                rows = self.efficiency_rows[-len(chunk):]
                for i, text, row in zip(chunk, texts, rows):
                    row.update(doc_id=args[i][3], task=args[i][4])
                    results[i] = self._result(text, row)
                pbar.update(len(chunk))
        pbar.close()
        efficiency.synchronize(self._device)
        self.generate_seconds += time.perf_counter() - t0
        self._write_efficiency()
        self._print_summary()
        return results

    @staticmethod
    def _result(text: str, row: dict):
        """The text, with its token counts where lmms-eval can take them (its results JSON's `efficiency`)."""
        if GenerationResult is None:
            return text
        return GenerationResult(text=text, token_counts=TokenCounts(input_tokens=row.get("prompt_tokens"),
                                                                    output_tokens=row.get("generated_tokens")))

    def _ratio_fields(self, row: int) -> dict:
        """The requested `ratio` and the layer-averaged fraction of visual tokens the methods report removing
        (`stats.removed_fraction`, video methods; sample 0 of a batch only, as their stats hold)."""
        out: dict = {}
        for h in self.handles:
            st = getattr(h, "stats", None)
            requested = getattr(getattr(h, "config", None), "ratio", None)
            if requested is not None:
                out.setdefault("requested_ratio", requested)
            removed = getattr(st, "removed_fraction", None) if row == 0 else None
            if isinstance(removed, (int, float)):
                out["removed_fraction"] = removed
        return out

    def _print_summary(self) -> None:
        if self._rank != 0 or not self.efficiency_rows:
            return
        s = efficiency.summarize(self.efficiency_rows)
        parts = [f"{s['samples']} samples"]
        if "mean_prefill_ms" in s:
            parts.append(f"prefill {s['mean_prefill_ms']:.1f} ms")
        if "mean_kept_tokens" in s and "mean_prompt_tokens" in s:
            parts.append(f"kept tokens {s['mean_kept_tokens']:.1f}/{s['mean_prompt_tokens']:.1f}")
        if "mean_kv_bytes" in s:
            parts.append(f"KV {s['mean_kv_bytes'] / 1024:.1f} KiB")
        if "mean_removed_fraction" in s:
            requested = s.get("mean_requested_ratio")
            parts.append(f"visual tokens removed {s['mean_removed_fraction']:.3f} (layer-averaged"
                         + (f", ratio {requested:g} requested)" if requested is not None else ")"))
        tp = self._throughput()
        if tp["samples_per_s"]:
            parts.append(f"{tp['samples_per_s']:.2f} samples/s ({', '.join(f'{k}: {v}' for k, v in tp['paths'].items())})")
        where = f" -> {self.efficiency_log}" if self.efficiency_log else " (efficiency_log=PATH to save per sample)"
        print(f"[mllm_efficiency] {self.chain.label}: " + ", ".join(parts) + " (means)" + where, flush=True)
        for h in self.handles:  # a ratio a method could not reach, or one its explicit budget overrode
            note = getattr(getattr(h, "stats", None), "ratio_note", None)
            if note:
                print(f"[mllm_efficiency] note: {note}", flush=True)

    def _throughput(self) -> dict:
        paths: dict = {}
        for row in self.efficiency_rows:
            paths[row.get("path", "stock")] = paths.get(row.get("path", "stock"), 0) + 1
        n = len(self.efficiency_rows)
        return {"generate_seconds": self.generate_seconds, "paths": paths,
                "samples_per_s": n / self.generate_seconds if self.generate_seconds > 0 else None}

    def _write_efficiency(self) -> None:
        if self.efficiency_log is None:
            return
        self.efficiency_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.efficiency_log, "w") as f:
            for row in self.efficiency_rows:
                f.write(json.dumps(row) + "\n")
        summary = {"method": self.chain.label, "method_params": [dict(c) for c in self.chain.configs],
                   **efficiency.summarize([{k: v for k, v in r.items() if k not in ("doc_id", "batch")}
                                           for r in self.efficiency_rows]),
                   **self._throughput()}
        self.efficiency_log.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res = []
        for context, continuation, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            visuals = self._visuals(doc_to_visual(doc)) if doc_to_visual is not None else []
            prompt = self.build_prompt(context, len(visuals))
            kw = dict(images=visuals) if visuals else {}
            full = self.processor(text=[prompt + continuation], return_tensors="pt", **kw).to(self._device)
            ctx_len = self.processor(text=[prompt], return_tensors="pt", **kw)["input_ids"].shape[1]
            if "pixel_values" in full:
                full["pixel_values"] = full["pixel_values"].to(self._model.dtype)
            with torch.inference_mode():
                logits = self._model(**full).logits[:, ctx_len - 1:-1].float()
            target = full["input_ids"][:, ctx_len:]
            logp = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            res.append((float(logp.sum()), bool((logits.argmax(-1) == target).all())))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mllm_efficiency: multi-round generation is not supported")
