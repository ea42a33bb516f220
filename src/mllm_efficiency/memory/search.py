"""The seed's Python API: `patch_hf(model, type, conf)` and the chunked-prefill `GreedySearch` generator
(docs/long_context_memory.md, "Python API").

    patch_hf(model, "qllm", conf.model)             # thin alias of mllm_efficiency.apply; handle on the model
    searcher = GreedySearch(model, tokenizer)
    searcher.generate(text=prompt, question="What is the pass key?", max_new_tokens=32, chunk_size=8192)
    searcher.last_stats; searcher.clear()

Prompts are prefilled `chunk_size` tokens per forward (logits of the last position only), then decoded
greedily one token per forward. Several prompts run one after the other, each on a fresh memory.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from ..adapters import get_adapter
from ..core import attachments
from ..errors import ConfigError

log = logging.getLogger("mllm_efficiency.memory")

# YAML `type` spellings (the seed's and ours) -> registered method name; None = no method (dense)
METHOD_OF_TYPE = {
    "qllm": "qllm", "q-llm": "qllm",
    "inf-llm": "infllm", "infllm": "infllm",
    "stream-llm": "streamingllm_memory", "streamingllm": "streamingllm_memory",
    "streaming-llm": "streamingllm_memory", "streamingllm_memory": "streamingllm_memory",
    "infinite-lm": "lm_infinite", "lm-infinite": "lm_infinite", "lm_infinite": "lm_infinite",
    "origin": None, "none": None, "full": None,
}
_HANDLE_ATTR = "memory_handle"
# keys of a YAML `model:` section that describe loading, not the method
_NON_METHOD_KEYS = {"type", "path", "tokenizer_path", "fattn", "faiss"}


def method_of_type(attn_type: str) -> str | None:
    key = str(attn_type).strip().lower()
    if key not in METHOD_OF_TYPE:
        raise ConfigError(f"type must be one of {sorted(METHOD_OF_TYPE)}, got {attn_type!r}")
    return METHOD_OF_TYPE[key]


def method_kwargs_from_model_section(section: Mapping) -> dict:
    """A YAML `model:` mapping -> keyword arguments of the method (fattn -> kernel, loading keys dropped)."""
    kw = {k: v for k, v in dict(section).items() if k not in _NON_METHOD_KEYS}
    if section.get("fattn"):
        kw.setdefault("kernel", "flex")
    if section.get("faiss"):
        raise ConfigError("faiss: true is not supported (a CPU faiss index has no question term); allowed: false")
    return kw


def patch_hf(model, attn_type: str, attn_kwargs: Mapping | None = None, base: float | None = None,
             distance_scale: float | None = None, **kw):
    """The seed's entry point: attach the memory method for YAML `type` to `model` and return the model.
    Accepts `patch_hf(model, "qllm", conf.model)` and `patch_hf(model, conf.model.type, **conf.model)`.
    The handle is `model.memory_handle` (`.remove()` restores the model); patching again replaces it."""
    import mllm_efficiency as me

    merged: dict[str, Any] = {}
    if attn_kwargs is not None:
        merged.update(_plain(attn_kwargs))
    merged.update(kw)
    if base is not None:
        merged["base"] = base
    if distance_scale is not None:
        merged["distance_scale"] = distance_scale
    method = method_of_type(attn_type)
    old = getattr(model, _HANDLE_ATTR, None)
    if old is not None:
        old.remove()
    setattr(model, _HANDLE_ATTR, None)
    if method is not None:
        setattr(model, _HANDLE_ATTR, me.apply(model, method, **method_kwargs_from_model_section(merged)))
    return model


def _plain(obj) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(obj, DictConfig):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:
        pass
    return dict(obj)


def locate_question(prompt_ids: Sequence[int], question_ids: Sequence[int]) -> tuple[int, int] | None:
    """First occurrence of `question_ids` in `prompt_ids` as a span [start, end); if absent and the question has
    more than 2 tokens, search without its first and last token and widen the hit by one on each side (BPE
    boundaries). None if not found."""
    p = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    for q, widen in ((list(question_ids), 0), (list(question_ids)[1:-1], 1)):
        if widen and len(question_ids) <= 2:
            break
        n = len(q)
        if n == 0 or n > p.numel():
            continue
        hits = (p.unfold(0, n, 1) == torch.tensor(q)).all(1).nonzero()
        if hits.numel():
            s = int(hits[0, 0])
            return max(s - widen, 0), min(s + n + widen, p.numel())
    return None


class GreedySearch:
    """Chunked prefill + greedy decoding on a model with (or without) a memory method attached."""

    def __init__(self, model, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.adapter = get_adapter(model)
        self.cache = None
        self._carry: list[int] = []  # the last generated token, not yet fed (multi-turn continuation)
        self.last_stats: dict = {}

    @property
    def engine(self):
        return attachments.memory_engine(self.adapter)

    def clear(self) -> None:
        """Drop the memory before an unrelated prompt."""
        self.cache = None
        self._carry = []
        if self.engine is not None:
            self.engine.set_question()
            self.engine.active = None

    # ------------------------------------------------------------------ public
    def generate(self, input_ids=None, text=None, attention_mask=None, question=None, question_span=None,
                 max_new_tokens: int | None = None, chunk_size: int = 8192, extra_end_token_ids=(),
                 output: bool = False, inputs_embeds=None, pixel_values=None, image_sizes=None, reset: bool = False,
                 max_length: int | None = None, do_sample: bool = False, progress: bool = False,
                 max_len: int | None = None, truncation: str = "none", **gen_kwargs) -> list[str]:
        """Greedy answers, one per prompt. Exactly one of input_ids / text / inputs_embeds. A list of prompts (or
        a padded batch with attention_mask) runs each prompt on a fresh memory; `question` may then be a list."""
        if do_sample or gen_kwargs.get("temperature") not in (None, 0, 0.0, 1.0):
            raise ConfigError("do_sample / temperature: GreedySearch is greedy only; allowed: do_sample=False")
        unknown = set(gen_kwargs) - {"temperature"}
        if unknown:
            raise ConfigError(f"generate: unknown argument(s) {sorted(unknown)}")
        if max_length is not None:
            warnings.warn("max_length is deprecated; use max_new_tokens", DeprecationWarning, stacklevel=2)
            max_new_tokens = max_new_tokens or max_length
        max_new_tokens = 128 if max_new_tokens is None else int(max_new_tokens)
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if int(chunk_size) < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        if truncation not in ("none", "suffix", None):
            raise ConfigError(f"truncation must be one of ['none', 'suffix'], got {truncation!r}")
        if sum(x is not None for x in (input_ids, text, inputs_embeds)) != 1:
            raise ConfigError("generate: pass exactly one of input_ids, text, inputs_embeds")
        prompts = self._prompts(input_ids, text, attention_mask, inputs_embeds)
        questions = question if isinstance(question, (list, tuple)) else [question] * len(prompts)
        spans = question_span if (isinstance(question_span, (list, tuple)) and question_span
                                  and isinstance(question_span[0], (list, tuple))) else [question_span] * len(prompts)
        if len(questions) != len(prompts) or len(spans) != len(prompts):
            raise ConfigError(f"question / question_span: one per prompt expected ({len(prompts)} prompts)")
        answers, all_stats = [], []
        for i, ids_or_embeds in enumerate(prompts):
            if reset or len(prompts) > 1:
                self.clear()
            if truncation == "suffix" and max_len is not None and isinstance(ids_or_embeds, list):
                ids_or_embeds = _truncate_suffix(ids_or_embeds, int(max_len), max_new_tokens)
            vision = {"pixel_values": pixel_values, "image_sizes": image_sizes} if pixel_values is not None else {}
            ans, stats = self._one(ids_or_embeds, questions[i], spans[i], max_new_tokens, int(chunk_size),
                                   list(extra_end_token_ids or ()), output, progress, vision)
            answers.append(ans)
            all_stats.append(stats)
        self.last_stats = all_stats[0] if len(all_stats) == 1 else {"per_prompt": all_stats}
        self.all_stats = all_stats
        return answers

    # ------------------------------------------------------------------ internals
    def _prompts(self, input_ids, text, attention_mask, inputs_embeds) -> list:
        if text is not None:
            if self.tokenizer is None:
                raise ConfigError("text=: GreedySearch was built without a tokenizer")
            texts = [text] if isinstance(text, str) else list(text)
            return [list(self.tokenizer(t, return_tensors=None)["input_ids"]) for t in texts]
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3:
                raise ConfigError(f"inputs_embeds must be (batch, length, hidden), got {tuple(inputs_embeds.shape)}")
            return [inputs_embeds[b:b + 1] for b in range(inputs_embeds.shape[0])]
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            rows = []
            for b in range(input_ids.shape[0]):
                row = input_ids[b]
                if attention_mask is not None:
                    row = row[attention_mask[b].bool()]
                rows.append(row.tolist())
            return rows
        if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], int):
            return [list(input_ids)]
        return [list(r) for r in input_ids]

    def _embed(self, ids: list[int], vision: dict) -> torch.Tensor:
        device = next(self.model.parameters()).device
        t = torch.tensor([ids], dtype=torch.long, device=device)
        if vision:
            return self.adapter.merged_inputs_embeds(input_ids=t, **{k: v for k, v in vision.items()
                                                                     if v is not None})
        return self.adapter.text_model.get_input_embeddings()(t)

    def _resolve_question(self, engine, ids, question, question_span, chunk_size, vision) -> str:
        cfg = engine.config
        if question_span is not None:
            s, e = int(question_span[0]), int(question_span[1])
            if ids is not None and not 0 <= s < e <= len(ids):
                raise ConfigError(f"question_span must satisfy 0 <= start < end <= {len(ids)}, got {question_span}")
            if cfg.question_source != "probe" and e <= chunk_size:
                engine.set_question(span=(s, e))
                return "span"
            q_ids = ids[s:e] if ids is not None else None
            if q_ids is None:
                raise ConfigError("question_span with inputs_embeds needs the span inside the first chunk")
            engine.probe(self._embed(q_ids, {}))
            return "probe"
        if question is not None:
            if self.tokenizer is None:
                raise ConfigError("question=: GreedySearch was built without a tokenizer")
            q_ids = list(self.tokenizer(question, add_special_tokens=False)["input_ids"])
            if not q_ids:
                raise ConfigError("question is empty after tokenization")
            span = locate_question(ids, q_ids) if ids is not None and cfg.question_source != "probe" else None
            if span is not None and span[1] <= chunk_size:
                engine.set_question(span=span)
                return "span"
            if cfg.question_source == "span":
                raise ValueError(f"question {question!r} was not found in the prompt's first chunk and "
                                 "question_source='span'; allowed: 'auto' or 'probe' to run it separately")
            engine.probe(self._embed(q_ids, {}))
            return "probe"
        if cfg.on_missing_question == "infllm":
            log.warning("%s: no question given; running as InfLLM (no question term)", engine.method)
            engine.set_question()
            engine.question_checked = True
            return "none"
        raise ValueError(f"{engine.method}: query-aware mode needs a question: pass question='...' or "
                         "question_span=(start, end), or set on_missing_question='infllm'")

    def _forward(self, embeds, start: int):
        kw = {self.adapter.cache_kwarg: self.cache}
        pos = torch.arange(start, start + embeds.shape[1], device=embeds.device)[None]
        return self.model(inputs_embeds=embeds, position_ids=pos, use_cache=True, logits_to_keep=1, **kw).logits

    @torch.no_grad()
    def _one(self, prompt, question, question_span, max_new_tokens, chunk_size, extra_end, output, progress,
             vision):
        engine = self.engine
        cuda = torch.cuda.is_available()
        device = next(self.model.parameters()).device
        if cuda and device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ids = prompt if isinstance(prompt, list) else None
        fresh = self.cache is None
        if ids is not None and self._carry:
            ids = self._carry + ids
        self._carry = []
        qsource = None
        if engine is not None and engine.config.query_aware and fresh:
            qsource = self._resolve_question(engine, ids, question, question_span, chunk_size, vision)
        elif engine is not None and fresh:
            engine.set_question()
        if fresh:
            self.cache = engine.new_cache() if engine is not None else _dense_cache()
        embeds = self._embed(ids, vision) if ids is not None else prompt.to(device)
        n = embeds.shape[1]
        start = self.cache.get_seq_length()
        starts = list(range(0, n, chunk_size))
        bar = _progress(len(starts), progress)
        logits = None
        for s in starts:
            logits = self._forward(embeds[:, s:s + chunk_size], start + s)
            bar.update(1)
        bar.close()
        if cuda and device.type == "cuda":
            torch.cuda.synchronize()
        t_prefill = time.perf_counter() - t0
        eos = self._end_ids(extra_end)
        new: list[int] = []
        pos = start + n
        ttft = None
        while len(new) < max_new_tokens:
            tok = int(logits[0, -1].argmax())
            if ttft is None:
                ttft = time.perf_counter() - t0
            if tok in eos:
                break
            new.append(tok)
            if output and self.tokenizer is not None:
                sys.stdout.write(self.tokenizer.decode([tok]))
                sys.stdout.flush()
            if len(new) == max_new_tokens:
                self._carry = [tok]
                break
            emb = self.adapter.text_model.get_input_embeddings()(torch.tensor([[tok]], device=device))
            logits = self._forward(emb, pos)
            pos += 1
        if output:
            sys.stdout.write("\n")
        if cuda and device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer is not None else ""
        stats = {"input_tokens": n, "prefill_time_sec": t_prefill, "decode_time_sec": total - t_prefill,
                 "inference_time_sec": total, "ttft_sec": ttft if ttft is not None else t_prefill,
                 "tokens_generated": len(new), "new_token_ids": new, "question_source": qsource,
                 "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda and device.type == "cuda" else None,
                 "peak_reserved_GB": torch.cuda.max_memory_reserved() / 1e9 if cuda and device.type == "cuda" else None,
                 "chunks": len(starts)}
        if engine is not None:
            stats["memory"] = dict(engine.stats)
        return text, stats

    def _end_ids(self, extra) -> set[int]:
        ids = set(int(t) for t in extra)
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is None:
                continue
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return ids


def _dense_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _truncate_suffix(ids: list[int], max_len: int, max_gen: int) -> list[int]:
    """Keep the first 128 and the last max_len - max_gen - 128 tokens (on ids, never re-encoded)."""
    if len(ids) <= max_len:
        return ids
    tail = max(max_len - max_gen - 128, 0)
    return ids[:128] + (ids[len(ids) - tail:] if tail else [])


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="prefill chunks", unit="chunk", file=sys.stderr)
