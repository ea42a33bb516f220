"""The KV-compression engine: one per model; the attached method contributes a `Policy`.

At a fresh prefill the engine gets a `TrackedCache` from the shared `ModelContext`. The attention wrapper
(core.attention) calls `_on_attention` right after each layer's attention: the policy scores that layer
from the post-RoPE query and the keys attention saw, and the engine gathers the kept slots in the layer's
cache (`TrackedLayer.select`). The prefill attention itself used the full K/V, so prefill outputs are
unchanged; decoding then runs on the smaller cache, with `ModelContext` translating masks per layer (and per
KV head where the kept slots differ between heads). Policies that need every layer's statistics
(VL-Cache) only record per layer and select after the whole prefill forward.
During decoding (any continuation of a compressed cache) policies with decode-time eviction update their
scores each step and evict back to the layer's budget every `evict_every` steps.
Only fresh prefills (empty cache) are compressed; multi-token continuations (a chunked prefill's later
chunks, a second turn) are appended as they are.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from ..core import attachments
from ..core.attention import AttentionHub
from ..core.cache import TrackedCache, TrackedLayer
from ..core.context import ModelContext
from ..errors import ConfigError
from . import primitives as P
from .base import LayerInput, Policy, Selection
from ..core.device import device_ints



@dataclasses.dataclass
class _Prefill:
    cache: TrackedCache
    batch: int
    pad: torch.Tensor | None  # (B, L) bool real tokens of the prompt (None: no padding)
    visual: torch.Tensor | None  # (B, L) bool
    counts: dict = dataclasses.field(default_factory=dict)  # memo: slot layout -> real tokens per sample
    records: dict = dataclasses.field(default_factory=dict)  # layer -> (LayerInput, record) for post passes
    kept: dict = dataclasses.field(default_factory=dict)  # layer -> (B, Hc) tensor of kept counts
    lengths: dict = dataclasses.field(default_factory=dict)  # layer -> [L_b]
    bytes_before: int = 0


@dataclasses.dataclass
class _Decode:
    cache: TrackedCache


class KVEngine:
    def __init__(self, model: nn.Module, adapter):
        self.model = model
        self.adapter = adapter
        self.policy: Policy | None = None
        self.req = None
        self._ctx = ModelContext.acquire(adapter)
        self.hub = AttentionHub.acquire(adapter)
        self.hub.add_callback(self._on_attention)
        text = adapter.text_model
        self._handles = [text.register_forward_pre_hook(self._on_text_model, with_kwargs=True),
                         text.register_forward_hook(self._after_text_model, with_kwargs=True)]

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def attach(cls, model: nn.Module, adapter, policy: Policy) -> "KVEngine":
        engine = attachments.kv_engine(adapter)
        if engine is not None:
            raise ConfigError(f"{policy.name}: KV method {engine.policy.name!r} is already attached to this model; "
                              "remove it first (one KV compression method per model)")
        engine = cls(model, adapter)
        engine.policy = policy
        attachments.attach(adapter.text_model, attachments.KV_ENGINE, engine)
        return engine

    def detach(self, policy: Policy) -> None:
        if policy is not self.policy:
            return
        self.policy = None
        self.req = None
        for h in self._handles:
            h.remove()
        self.hub.remove_callback(self._on_attention)
        self.hub.release()
        self._ctx.release()
        attachments.detach(self.adapter.text_model, attachments.KV_ENGINE, self)

    # ----------------------------------------------------------------- text model
    def _on_text_model(self, module, args, kwargs):
        self.req = None
        policy = self.policy
        cache = kwargs.get(self.adapter.cache_kwarg)
        if not self._ctx.fresh:
            if policy.config.decode != "none" and isinstance(cache, TrackedCache):
                self.req = _Decode(cache)
            return None
        ids = self._ctx.input_ids
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return None
        B, L = ref.shape[0], ref.shape[1]
        lengths = self._ctx.prompt_lengths(kwargs, B, L, policy.name)
        pad = kwargs["attention_mask"].bool() if min(lengths) < L else None
        if not policy.active(lengths):
            return None
        cache = self._ctx.ensure_tracked_cache(kwargs, policy.name)
        if cache is None:
            return None
        visual = None
        if policy.needs_visual and ids is not None:
            visual = self.adapter.visual_mask(ids)
        self.req = _Prefill(cache, B, pad, visual)
        policy.stats.reset()
        return args, kwargs

    def _after_text_model(self, module, args, kwargs, output):
        req, self.req = self.req, None
        if not isinstance(req, _Prefill):
            return None
        policy = self.policy
        if policy.layer_wise_post_pass and req.records:
            t0 = time.perf_counter()
            selections = policy.finish(req.records)
            policy.stats.scoring_time_s += time.perf_counter() - t0
            for i, sel in sorted(selections.items()):
                inp = req.records[i][0]
                self._apply(req, req.cache.layers[i], inp, sel)
        self._finish_stats(req)
        return None

    # ----------------------------------------------------------------- attention callback
    def _on_attention(self, module, query, key, value, attention_mask, kwargs):
        req = self.req
        if req is None:
            return
        i = module.layer_idx
        layer = req.cache.layers[i] if i < len(req.cache.layers) else None
        if not isinstance(layer, TrackedLayer):
            return
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        attn_kw = {"softcap": kwargs.get("softcap"), "sliding_window": kwargs.get("sliding_window")}
        if isinstance(req, _Prefill):
            self._prefill_layer(req, i, layer, query, key, value, attention_mask, scaling, attn_kw)
        else:
            self._decode_layer(layer, query, key, attention_mask, scaling, attn_kw)

    def _prefill_layer(self, req: _Prefill, i, layer, query, key, value, mask, scaling, attn_kw) -> None:
        policy = self.policy
        B, S = key.shape[0], key.shape[2]
        pos = layer.slot_positions(batch=B, device=key.device).expand(B, -1)
        real = layer.slot_valid()
        real = torch.ones(B, S, dtype=torch.bool, device=key.device) if real is None else real.expand(B, -1)
        if req.pad is not None:
            real = real & req.pad.gather(1, pos)
        memo = (id(layer.prefix_pos), id(layer.prefix_valid), S)
        if memo not in req.counts:  # FastV-pruned layers share one layout: one host sync per layout
            req.counts[memo] = self._ctx.host_values.read("kv_real_counts", lambda: real.sum(1).tolist())
        lengths = req.counts[memo]
        visual = None if req.visual is None else req.visual.gather(1, pos)
        inp = LayerInput(i, self.adapter.num_layers, query, key, value, mask, scaling, attn_kw, real, pos,
                         lengths, [policy.config.keep(n) for n in lengths], visual)
        req.bytes_before += _nbytes(key) + _nbytes(value)
        t0 = time.perf_counter()
        if policy.layer_wise_post_pass:
            record = policy.record(inp)
            req.records[i] = (dataclasses.replace(inp, query=None, mask=None), record)
            policy.stats.scoring_time_s += time.perf_counter() - t0
            req.lengths[i] = lengths
            return
        sel = policy.select(inp)
        policy.stats.scoring_time_s += time.perf_counter() - t0
        self._apply(req, layer, inp, sel)

    def _apply(self, req: _Prefill, layer: TrackedLayer, inp: LayerInput, sel: Selection | None) -> None:
        cfg = self.policy.config
        i = inp.layer
        req.lengths[i] = inp.lengths
        decode = cfg.decode != "none"
        if sel is None or (not decode and _untouched(sel.keep, inp.lengths)):
            return
        counts = [k if isinstance(k, list) else [k] for k in sel.keep]
        kmax = max(max(c) for c in counts)
        keep_t = device_ints(counts, inp.key.device)  # (B, 1 | Hkv)
        idx, valid = P.select_slots(sel.score, sel.candidate, sel.protected, keep_t, kmax)
        full = all(c == kmax for row in counts for c in row)
        per_sample = idx.shape[1] == 1
        merged = sel.merge(inp, idx, valid) if sel.merge is not None else None
        layer.score = sel.decode_score if decode else None
        layer.select(idx[:, 0] if per_sample else idx, True if full else (valid[:, 0] if per_sample else valid))
        if merged is not None:
            layer.keys, layer.values = merged
        if decode:
            budget = [max(row) for row in counts] if cfg.decode_budget is None else [cfg.decode_budget] * req.batch
            layer.budget = tuple(budget)
        req.kept[i] = valid.sum(-1)

    # ----------------------------------------------------------------- decode-time eviction
    def _decode_layer(self, layer: TrackedLayer, query, key, mask, scaling, attn_kw) -> None:
        if layer.budget is None:
            return
        policy = self.policy
        policy.decode_update(layer, query, key, mask, scaling, attn_kw)
        stored = layer.get_seq_length()
        kmax = max(layer.budget)
        if stored - layer.prefix_len < policy.config.evict_every or stored <= kmax:
            return
        B = key.shape[0]
        real = layer.slot_valid()
        real = torch.ones(B, stored, dtype=torch.bool, device=key.device) if real is None else real
        if real.dim() == 2:
            real = real.unsqueeze(1)
        score, protected = policy.decode_scores(layer, real)
        budget = torch.tensor(layer.budget, device=key.device)
        idx, valid = P.select_slots(score, real, protected, budget, kmax)
        full = len(set(layer.budget)) == 1 and layer.prefix_valid is None
        per_sample = idx.shape[1] == 1
        layer.select(idx[:, 0] if per_sample else idx, True if full else (valid[:, 0] if per_sample else valid))
        policy.stats.decode_evictions += 1

    # ----------------------------------------------------------------- stats
    def _finish_stats(self, req: _Prefill) -> None:
        st = self.policy.stats
        st.prefills += 1
        n = self.adapter.num_layers
        layers = req.cache.layers
        kept_host = self._ctx.host_values.read(  # one sync for the whole prefill
            "kv_kept_counts", lambda: {i: t.tolist() for i, t in req.kept.items()})
        st.prompt_lengths = [list(req.lengths.get(i, [])) for i in range(n)]
        st.kept_per_head, st.kept = [], []
        for i in range(n):
            rows = kept_host.get(i)
            if rows is None:  # untouched layer
                rows = [[x] for x in st.prompt_lengths[i]]
            st.kept_per_head.append(rows)
            st.kept.append([sum(r) / len(r) if len(set(r)) > 1 else r[0] for r in rows])
        st.stored = [layers[i].get_seq_length() if i < len(layers) else 0 for i in range(n)]
        st.bytes_before = req.bytes_before
        st.bytes_after = sum(_nbytes(layers[i].keys) + _nbytes(layers[i].values)
                             for i in req.lengths if layers[i].keys is not None)


def _untouched(keep: list, lengths: list[int]) -> bool:
    return all((min(k) if isinstance(k, list) else k) >= n for k, n in zip(keep, lengths))


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
