"""Attaching a block-memory method to a model (docs/long_context_memory.md, "How it attaches").

- forward hooks on every attention module's `q_proj` / `k_proj` capture the raw (unrotated) projections;
- a pre-hook on the decoder stack puts a `BlockMemoryCache` in place of a missing or empty cache (so plain
  `model(...)` and `model.generate(...)` work without extra arguments) and refuses padded batches;
- an attention function registered through `AttentionInterface` (the decoder config is switched to it) ignores
  the model's rotated q/k and mask and runs each layer's `MemoryUnit` on the captured raw projections.
`remove()` undoes all three: the model is back to its stock behaviour.
"""
from __future__ import annotations

import logging

import torch
from ..core import attachments
from ..core.attachments import MEMORY_ENGINE
from ..core.attention import register_attention, release_attention
from ..errors import ConfigError
from ..core.threads import ForwardGuard
from .cache import BlockMemoryCache
from .rope import RopeTable, rotate_half  # noqa: F401  (rotate_half re-exported for tests)
from .unit import MemoryUnit, question_vector

log = logging.getLogger("mllm_efficiency.memory")

ATTN_NAME = "mllm_eff_block_memory"


def _memory_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    engine = attachments.attached(module, MEMORY_ENGINE)
    if engine is None:
        raise RuntimeError(f"attention implementation {ATTN_NAME!r} used on a module without a memory method "
                           "attached; call model.set_attn_implementation('sdpa')")
    return engine.attend(module, value, scaling if scaling is not None else module.scaling)


# sizes allocated up front (rotation table) or on the first blocks (resident block slots) are bounded here, before
# anything is allocated: a typo such as n_init=10**9 must not try a multi-GB allocation
MIN_ROTATION_LIMIT = 1 << 17  # positions; a model's larger max_position_embeddings raises the limit
MAX_RESIDENT_TOKENS = 1 << 20  # max_cached_block * block_size


def _rotation_length(method: str, config, text_config) -> int:
    n = config.n_local + config.exc_block_size + config.n_init + 1
    model_max = int(getattr(text_config, "max_position_embeddings", 0) or 0)
    limit = max(model_max, MIN_ROTATION_LIMIT)
    if n > limit:
        raise ConfigError(f"{method}: n_init + n_local + exc_block_size = {n - 1} positions to rotate; allowed up to "
                          f"{limit - 1} (max(max_position_embeddings = {model_max}, {MIN_ROTATION_LIMIT})): "
                          "lower n_init / n_local / exc_block_size")
    resident = config.max_cached_block * config.block_size
    if resident > MAX_RESIDENT_TOKENS:
        raise ConfigError(f"{method}: max_cached_block * block_size = {resident} resident tokens per layer; allowed "
                          f"up to {MAX_RESIDENT_TOKENS}: lower max_cached_block or block_size")
    return n


class MemoryStats(dict):
    """Totals over layers of the last memory used (tokens, sinks, blocks, loads, hits, ...)."""


class MemoryEngine:
    def __init__(self, model, adapter, method: str, config):
        if adapter.uses_mrope:
            raise NotImplementedError(f"{method}: block memory does not support M-RoPE models "
                                      f"({adapter.family}); supported: Llama, Mistral, Qwen2/2.5, LLaVA-NeXT/"
                                      "OneVision with a 1-D RoPE language model")
        text = adapter.text_model
        if attachments.memory_engine(adapter) is not None:
            raise ConfigError(f"{method}: a memory method is already attached to this model; remove it first")
        modules = adapter.attention_modules()  # which methods may share the model: core.composition
        for m in modules:
            if not (hasattr(m, "q_proj") and hasattr(m, "k_proj")):
                raise NotImplementedError(f"{method}: attention module {type(m).__name__} has no q_proj/k_proj")
        self.model, self.adapter, self.method, self.config = model, adapter, method, config
        tc = adapter.text_config
        self.num_heads = tc.num_attention_heads
        self.num_kv_heads = getattr(tc, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(modules[0], "head_dim", tc.hidden_size // self.num_heads)
        max_pos = _rotation_length(method, config, tc)
        self.rope = RopeTable(text.rotary_emb, self.head_dim, max_pos, config.base, config.distance_scale)
        if config.kernel == "flex":
            log.warning("%s: kernel='flex' is not available in this version; using the torch kernel", method)
        self.question_span: tuple[int, int] | None = None
        self.question_vectors: dict[int, torch.Tensor] | None = None
        self.question_checked = False
        self.active: BlockMemoryCache | None = None
        self._captured: dict[int, dict[str, torch.Tensor]] = {}
        self._probing = False
        self._handles = ForwardGuard(model).install(*dict.fromkeys((model, text)))
        self._removed = False
        for m in modules:
            m.__dict__[MEMORY_ENGINE] = self
            self._handles.append(m.q_proj.register_forward_hook(self._capture(m.layer_idx, "q")))
            self._handles.append(m.k_proj.register_forward_hook(self._capture(m.layer_idx, "k")))
        self._handles.append(text.register_forward_pre_hook(self._on_text_model, with_kwargs=True))
        register_attention(ATTN_NAME, _memory_attention)
        self._original_impl = tc._attn_implementation
        tc._attn_implementation = ATTN_NAME
        attachments.attach(text, MEMORY_ENGINE, self)

    # ------------------------------------------------------------------ lifecycle
    def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.adapter.attention_modules():
            m.__dict__.pop(MEMORY_ENGINE, None)
        self.adapter.text_config._attn_implementation = self._original_impl
        release_attention(ATTN_NAME)
        attachments.detach(self.adapter.text_model, MEMORY_ENGINE, self)
        self.active = None

    def set_question(self, span: tuple[int, int] | None = None, vectors: dict | None = None) -> None:
        """The question for the next fresh prefill: a token span of the prompt or per-layer vectors (probe)."""
        if span is not None:
            s, e = int(span[0]), int(span[1])
            if not 0 <= s < e:
                raise ConfigError(f"question_span must be (start, end) with 0 <= start < end, got {span}")
            span = (s, e)
        self.question_span, self.question_vectors = span, vectors
        self.question_checked = False

    def new_cache(self) -> BlockMemoryCache:
        return BlockMemoryCache(self.adapter.num_layers)

    @property
    def stats(self) -> MemoryStats:
        out = MemoryStats(method=self.method, layers=0)
        units = [u for u in (self.active.units() if self.active is not None else []) if u is not None]
        for u in units:
            for k, v in u.stats().items():
                if isinstance(v, (int, float)):
                    out[k] = out.get(k, 0) + v
        if units:
            out["layers"] = len(units)
            out["tokens"] = units[0].seen
            out["sinks"] = int(units[0].init_k.shape[1])
            out["question"] = units[0].question_source
            looked = out.get("blocks_chosen", 0)
            out["cache_hit_rate"] = (out.get("hits", 0) / looked) if looked else None
        return out

    # ------------------------------------------------------------------ hooks
    def _capture(self, layer_idx: int, which: str):
        def hook(module, args, output):
            self._captured.setdefault(layer_idx, {})[which] = output
        return hook

    def _on_text_model(self, module, args, kwargs):
        key = self.adapter.cache_kwarg
        cache = kwargs.get(key)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise NotImplementedError(f"{self.method}: padded inputs are not supported by block memory; run one "
                                      "unpadded sequence per call (GreedySearch takes a list of prompts)")
        if not isinstance(cache, BlockMemoryCache):
            if cache is None:
                cache = self.new_cache()
            elif hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
                cache = BlockMemoryCache.adopt(cache, self.adapter.num_layers)
            else:
                raise ValueError(f"{self.method}: cannot continue a non-empty {type(cache).__name__}; start from "
                                 "an empty cache")
            kwargs[key] = cache
        if cache.get_seq_length() == 0 and not self._probing:
            self._check_question()
        self.active = cache
        return args, kwargs

    def _check_question(self) -> None:
        cfg = self.config
        if not cfg.query_aware or self.question_span is not None or self.question_vectors is not None:
            return
        if cfg.on_missing_question == "infllm":
            if not self.question_checked:
                log.warning("%s: no question given; running as InfLLM (no question term)", self.method)
            self.question_checked = True
            return
        raise ValueError(f"{self.method}: query-aware memory needs a question: pass question= / question_span= to "
                         "GreedySearch.generate or call handle.set_question(span=(start, end)) before the prefill; "
                         "or set on_missing_question='infllm' to run without it")

    # ------------------------------------------------------------------ attention
    def attend(self, module, value: torch.Tensor, scaling: float):
        idx = module.layer_idx
        got = self._captured.pop(idx, {})
        if "q" not in got or "k" not in got:
            raise RuntimeError(f"{self.method}: raw q/k of layer {idx} were not captured")
        B, S = got["q"].shape[:2]
        if B != 1:
            raise NotImplementedError(f"{self.method}: batch size {B} per forward; block memory runs one sequence "
                                      "per forward (GreedySearch.generate takes a list of prompts)")
        q = got["q"][0].view(S, self.num_heads, self.head_dim).transpose(0, 1)
        k = got["k"][0].view(S, self.num_kv_heads, self.head_dim).transpose(0, 1)
        v = value[0]
        if self._probing:
            out = self._probe_layer(idx, q, k, v, scaling)
        else:
            layer = self.active.layers[idx]
            if layer.unit is None:
                vec = self.question_vectors.get(idx) if self.question_vectors else None
                layer.unit = MemoryUnit(self.config, self.rope, self.num_heads, self.num_kv_heads, self.head_dim,
                                        v.device, v.dtype, question_span=self.question_span, question_vector=vec)
                if not self.config.query_aware:
                    layer.unit.question_span = None
            out = layer.unit.process(q.to(v.dtype), k.to(v.dtype), v, scaling)
        return out.transpose(0, 1).unsqueeze(0), None

    # ------------------------------------------------------------------ Q-LLM probe
    def _probe_layer(self, idx, q, k, v, scaling):
        """Full causal attention over the question alone; records the layer's question vector from the
        question's global queries weighted by the local attention mass its tokens received."""
        L = q.shape[1]
        G = self.num_heads // self.num_kv_heads
        if L > self.rope.max_pos:
            raise ValueError(f"{self.method}: question of {L} tokens is longer than the rotation table "
                             f"({self.rope.max_pos}); shorten the question")
        qs, ks = self.rope.rotate(q, 0), self.rope.rotate(k, 0)
        logits = torch.matmul(qs.reshape(self.num_kv_heads, G * L, -1), ks.transpose(1, 2)).float()
        logits = logits.view(self.num_kv_heads, G, L, L) * scaling
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        out = torch.matmul(probs.to(v.dtype).reshape(self.num_kv_heads, G * L, L), v).view(self.num_heads, L, -1)
        mass = probs.sum(2).reshape(self.num_heads, L)
        q_pos = self.config.n_local - 1
        self._probe_vectors[idx] = question_vector(self.rope.rotate_at(q, q_pos), mass, self.config.repr_topk)
        return out

    @torch.no_grad()
    def probe(self, question_embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        """Run the question (1, n, hidden) through the decoder once with full attention; returns per-layer
        question vectors (and keeps them for the next prefill)."""
        self._probe_vectors: dict[int, torch.Tensor] = {}
        self._probing = True
        try:
            n = question_embeds.shape[1]
            self.adapter.text_model(inputs_embeds=question_embeds, use_cache=False,
                                    position_ids=torch.arange(n, device=question_embeds.device)[None])
        finally:
            self._probing = False
        vectors = dict(self._probe_vectors)
        self.set_question(vectors=vectors)
        return vectors
