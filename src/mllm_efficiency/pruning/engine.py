"""The token-pruning engine: one per model, shared by every pruning method attached to it.

Methods contribute *steps* (FastV: "from layer K keep these tokens"). At each fresh prefill the engine
plans the steps, gets a `TrackedCache` from the shared `ModelContext`, and through its hooks:
- the attention wrapper (core.attention) hands post-RoPE q/k of scoring layers to the steps;
- pre-hooks on decoder layers shorten hidden states, RoPE cos/sin, position ids and the mask, and tell
  the cache which original positions each later layer stores;
- a hook on the final norm scatters the short sequence back to the prompt length.
Decode steps and later turns need nothing from the engine: the `ModelContext` translates masks for the
layers the cache marks as pruned. With no step acting on a request (ratio 0, keep == N) nothing is
substituted: outputs are unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..core import masks as M
from ..core import attachments
from ..core.attention import AttentionHub
from ..core.cache import TrackedCache
from ..core.context import ModelContext
from ..errors import NoVisualTokensError



@dataclasses.dataclass
class StepResult:
    """What a step's `select` decides at the input of its layer."""

    keep: torch.Tensor | None  # (B, Lcur) bool over the current slots: which stay (None: nothing changes here)
    kept_visual: list[int]  # visual tokens alive per sample after this step
    hidden: torch.Tensor | None = None  # a merging step's replacement for the hidden states (B, Lcur, D)


class PruningStep:
    """The contract of a step on the pruning engine (FastV, SimIgnore and the video methods implement it).

    Attributes: `layer` (the step acts at the input of this decoder layer), `score_layer` (the layer whose
    attention call hands q/k to `score`; None: no attention scores), `mode` ("inplace": kept slots are gathered,
    the sequence gets shorter; "mask": dropped slots are hidden as keys), `positions` ("original" position ids,
    or "renumber"d after the drops), `graph_capture` (the prefill may be captured as a CUDA graph: the step
    decides on the device from counts the graph's key fixes), `method_name`.
    """

    layer: int
    score_layer: int | None = None
    mode: str = "inplace"
    positions: str = "original"
    graph_capture: bool = False
    method_name: str = ""

    def visual_positions(self, detected: torch.Tensor | None, B: int, L: int, device) -> torch.Tensor:
        """(B, L) bool: the prompt's visual tokens as this step sees them (default: the adapter's detection)."""
        return detected

    def plan(self, visual: torch.Tensor, counts: list[int], real_lengths: list[int]) -> bool:
        """Before a fresh prefill: whether this step acts on it (False: it is skipped)."""
        raise NotImplementedError

    def score(self, req, module, query, key, attention_mask, kwargs):
        """At `score_layer`'s attention: scores for `select` (stored in `req.scores[self]`); None: nothing."""
        return None

    def select(self, req, hidden: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def finish(self, req, cache_lengths) -> None:
        """After the prefill: record statistics."""


class RatioStep(PruningStep):
    """A step that keeps `visual_keep_count(N, config.ratio)` of each sample's N visual tokens, on the adapter's
    detected visual tokens (`config.allow_text_only` runs prompts without any unchanged). Subclasses set
    `config`, `stats` (a `PruningStats`) and `method_name`, and implement `select`."""

    def visual_positions(self, detected, B: int, L: int, device) -> torch.Tensor:
        if detected is None:
            if self.config.allow_text_only:
                return torch.zeros(B, L, dtype=torch.bool, device=device)
            raise NoVisualTokensError(f"{self.method_name}: no image or video tokens found (the model config "
                                      "names no image token id)")
        return detected

    def plan(self, visual: torch.Tensor, counts: list[int], real_lengths: list[int]) -> bool:
        from ..flops import visual_keep_count

        if sum(counts) == 0 and not self.config.allow_text_only:
            raise NoVisualTokensError(f"{self.method_name}: no image or video tokens found in the prompt")
        self._keep = [visual_keep_count(n, self.config.ratio) for n in counts]
        st = self.stats
        st.num_visual, st.keep_count, st.kept_visual_mask, st.cache_lengths = counts, list(self._keep), visual, None
        return any(k < n for k, n in zip(self._keep, counts))

    def result(self, req, counts: list[int], targets: list[int], keep: torch.Tensor,
               kept_visual: torch.Tensor) -> StepResult:
        """Record the kept set (slots `kept_visual` (B, Lcur), in original positions) in the stats and return the
        step's result."""
        st = self.stats
        st.num_visual, st.keep_count = counts, list(targets)
        mask = torch.zeros(req.batch, req.length + 1, dtype=torch.bool, device=kept_visual.device)
        mask.scatter_(1, torch.where(req.valid, req.kept, req.length), kept_visual)
        st.kept_visual_mask = mask[:, :req.length]
        return StepResult(keep, list(targets))

    def finish(self, req, cache_lengths) -> None:
        self.stats.cache_lengths = cache_lengths
        self.stats.prefills += 1


class AttachedStep:
    """What `apply` returns for a method made of one pruning step: its stats, and `remove()`."""

    def attach_step(self, model, adapter, step: PruningStep) -> None:
        self.step = step
        self.engine = PruningEngine.attach(model, adapter, step)

    @property
    def stats(self):
        return self.step.stats

    def remove(self) -> None:
        self.engine.detach(self.step)


@dataclasses.dataclass
class Request:
    """State of one prefill forward while pruning acts on it."""

    input_ids: torch.Tensor | None
    visual: torch.Tensor  # (B, L) bool, original coordinates
    length: int
    batch: int
    cache: TrackedCache | None
    kept: torch.Tensor  # (B, Lcur) original index of each current slot
    valid: torch.Tensor  # (B, Lcur) False for filler slots (ragged batches)
    hidden_keys: torch.Tensor | None = None  # (B, L) original positions masked as keys (mask mode)
    scores: dict = dataclasses.field(default_factory=dict)
    active_steps: list = dataclasses.field(default_factory=list)
    sub: dict | None = None  # substituted layer kwargs for the current kept set
    pruned: bool = False  # the sequence length changed
    position_shift: torch.Tensor | None = None  # (B,) renumbered positions: tokens dropped per sample
    dropped_cum: torch.Tensor | None = None  # (B, L) renumbered positions: dropped tokens up to each position
    # host-side bookkeeping, so the prefill needs no GPU synchronisation beyond the first visual count
    lengths: list[int] = dataclasses.field(default_factory=list)  # valid slots per sample
    visual_counts: list[int] = dataclasses.field(default_factory=list)  # visible visual tokens per sample
    prompt_visual_counts: list[int] = dataclasses.field(default_factory=list)  # visual tokens of the prompt
    padding: list[int] = dataclasses.field(default_factory=list)  # left-padding tokens per sample

    @property
    def all_slots_valid(self) -> bool:
        return len(set(self.lengths)) <= 1 and self.hidden_keys is None

    @property
    def identity(self) -> bool:
        return not self.pruned

    def present_visual(self) -> torch.Tensor:
        """(B, Lcur) bool: the current slots that hold a visual token still present (not filler, not hidden by an
        earlier mask-mode step)."""
        visual = self.visual.gather(1, self.kept) & self.valid
        if self.hidden_keys is not None:
            visual &= ~self.hidden_keys.gather(1, self.kept)
        return visual

    def take_scores(self, step, method: str) -> torch.Tensor:
        """The scores `step` recorded at its score layer, cut to the current slots (removed from the request)."""
        score = self.scores.pop(step, None)
        if score is None:
            raise RuntimeError(f"{method}: no scores were recorded at layer {step.score_layer}")
        return score[:, -self.kept.shape[1]:]


@dataclasses.dataclass
class PruningStats:
    """What every pruning step records about the last prefill (per sample), plus counters."""

    num_visual: list[int] = dataclasses.field(default_factory=list)
    keep_count: list[int] = dataclasses.field(default_factory=list)
    kept_visual_mask: torch.Tensor | None = None  # (B, L) bool over the original positions
    cache_lengths: list[int] | None = None
    prefills: int = 0

    @property
    def kept_visual_positions(self) -> list[torch.Tensor]:
        """Original positions of the kept visual tokens, one sorted CPU tensor per sample."""
        if self.kept_visual_mask is None:
            return []
        return [row.nonzero().flatten().cpu() for row in self.kept_visual_mask]


class PruningEngine:
    def __init__(self, model: nn.Module, adapter):
        self.model = model
        self.adapter = adapter
        self.steps: list = []
        self.req: Request | None = None
        self._ctx = ModelContext.acquire(adapter)
        self.hub = AttentionHub.acquire(adapter)
        self.hub.add_callback(self._on_attention)
        text = adapter.text_model
        self._handles = []
        self._handles.append(text.register_forward_pre_hook(self._on_text_model, with_kwargs=True))
        self._handles.append(text.register_forward_hook(self._after_text_model, with_kwargs=True))
        self._handles.append(text.norm.register_forward_hook(self._on_final_norm))
        for i, layer in enumerate(adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def attach(cls, model: nn.Module, adapter, step) -> "PruningEngine":
        adapter.check_pruning_step(step)  # e.g. Qwen3-VL refuses a sequence shrunk before its DeepStack layers
        engine = attachments.pruning_engine(adapter)
        if engine is None:
            engine = cls(model, adapter)
            attachments.attach(adapter.text_model, attachments.PRUNING_ENGINE, engine)
        engine.steps.append(step)
        engine.steps.sort(key=lambda s: s.layer)
        return engine

    def detach(self, step) -> None:
        self.steps = [s for s in self.steps if s is not step]
        if self.steps:
            return
        for h in self._handles:
            h.remove()
        self.hub.remove_callback(self._on_attention)
        self.hub.release()
        self._ctx.release()
        attachments.detach(self.adapter.text_model, attachments.PRUNING_ENGINE, self)

    @property
    def inner_impl(self) -> str:
        return self._ctx.inner_impl

    # ----------------------------------------------------------------- entry and text model
    def _on_text_model(self, module, args, kwargs):
        """A fresh prefill (the context hook ran first): plan the steps, start a request."""
        self.req = None
        if not self._ctx.fresh:
            return None
        ids = self._ctx.input_ids
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return None
        B, L = ref.shape[0], ref.shape[1]
        padding = [L - n for n in self._ctx.prompt_lengths(kwargs, B, L, "token pruning")]
        visual = None if ids is None else self.adapter.visual_mask(ids)
        active = []
        counts = None
        for step in self.steps:
            step_visual = step.visual_positions(visual, B, L, ref.device)
            if step_visual is not visual or counts is None:
                # the one synchronisation of a prefill (replayed from the eager run under graph capture)
                counts = self._ctx.host_values.read("visual_counts", lambda v=step_visual: v.sum(1).tolist())
            if step.plan(step_visual, counts, [L - p for p in padding]):
                active.append(step)
                visual = step_visual
        if not active:
            return None
        cache = self._ctx.ensure_tracked_cache(kwargs, "token pruning")
        base = torch.arange(L, device=ref.device).unsqueeze(0).expand(B, -1)
        self.req = Request(ids, visual, L, B, cache, base, torch.ones(B, L, dtype=torch.bool, device=ref.device),
                           active_steps=active, lengths=[L] * B, visual_counts=list(counts), padding=padding,
                           prompt_visual_counts=list(counts))
        return args, kwargs

    def _after_text_model(self, module, args, kwargs, output):
        req, self.req = self.req, None
        if req is None:
            return None
        cache = req.cache
        lengths = cache.stored_lengths() if cache is not None else None
        for step in req.active_steps:
            step.finish(req, lengths)
        return None

    def _on_final_norm(self, module, args, output):
        req = self.req
        if req is None or req.identity:
            return None
        B, L = req.batch, req.length
        full = output.new_zeros(B, L + 1, output.shape[-1])
        index = torch.where(req.valid, req.kept, torch.full_like(req.kept, L))  # filler -> dummy slot L
        full.scatter_(1, index.unsqueeze(-1).expand(-1, -1, output.shape[-1]), output)
        return full[:, :L]

    # ----------------------------------------------------------------- attention callback (scores)
    def _on_attention(self, module, query, key, value, attention_mask, kwargs):
        req = self.req
        if req is None:
            return
        layer_idx = module.layer_idx
        for step in req.active_steps:
            if step.score_layer == layer_idx:
                req.scores[step] = step.score(req, module, query, key, attention_mask, kwargs)

    # ----------------------------------------------------------------- decoder layers
    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            if self.req is not None:
                return self._prefill_layer(i, args, kwargs)
            return None

        return hook

    def _prefill_layer(self, i: int, args, kwargs):
        req = self.req
        hidden = args[0] if args else kwargs["hidden_states"]
        changed = False
        for step in req.active_steps:
            if step.layer != i:
                continue
            result = step.select(req, hidden)
            keep, kept_visual = result.keep, result.kept_visual
            if result.hidden is not None:  # a merging step replaces the states it keeps
                hidden = result.hidden
            if keep is None:
                continue
            dropped_counts = [n - k for n, k in zip(req.visual_counts, kept_visual)]
            req.visual_counts = list(kept_visual)
            if step.mode == "inplace":
                req.lengths = [n - d for n, d in zip(req.lengths, dropped_counts)]
                hidden = self._shrink(req, keep, hidden)
            else:
                dropped = _to_original(req, ~keep & req.valid, False)
                req.hidden_keys = dropped if req.hidden_keys is None else (req.hidden_keys | dropped)
            changed = True
        if changed:
            req.sub = self._substitute(req, kwargs)
            if req.cache is not None:
                self._set_pending(req, i)
        if req.sub is None:
            return None
        new_kwargs = dict(kwargs)
        new_kwargs.update(req.sub)
        if args:
            return (hidden,) + tuple(args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs

    def _shrink(self, req: Request, keep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        keep = keep & req.valid
        counts = keep.sum(1)
        new_len = max(req.lengths)
        # stable order: kept slots in their original order, right-aligned; filler slots (index 0) first
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_len]  # kept first
        shift = new_len - counts  # filler count per sample
        slot = torch.arange(new_len, device=keep.device).unsqueeze(0)
        src = slot - shift.unsqueeze(1)
        valid_new = src >= 0
        local = order.gather(1, src.clamp_min(0))
        local = torch.where(valid_new, local, torch.zeros_like(local))
        if self._positions_mode(req) == "renumber":
            dropped = _to_original(req, ~keep, True)  # absent (dropped earlier) positions count as dropped
            req.position_shift = dropped.sum(1)
            req.dropped_cum = dropped.cumsum(1)
        req.kept = req.kept.gather(1, local)
        req.valid = valid_new & req.valid.gather(1, local)
        req.pruned = True
        return hidden.gather(1, local.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def _positions_mode(self, req: Request) -> str:
        modes = {s.positions for s in req.active_steps if s.mode == "inplace"}
        return "renumber" if "renumber" in modes else "original"

    def _set_pending(self, req: Request, from_layer: int) -> None:
        valid = req.valid
        if req.hidden_keys is not None:
            valid = valid & ~req.hidden_keys.gather(1, req.kept)
        valid_arg = None if req.all_slots_valid else valid
        pos_arg = req.kept if req.pruned else None
        for j in range(from_layer, self.adapter.num_layers):
            req.cache.layers[j].set_pending(pos_arg, valid_arg, req.length, req.position_shift)

    def _substitute(self, req: Request, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Layer kwargs for the current kept set; computed once, reused by every later layer."""
        sub: dict[str, Any] = {}
        kept, valid = req.kept, req.valid
        mask = kwargs.get("attention_mask")
        fmt = M.mask_format(mask, self.inner_impl)
        key_ok = valid
        if req.hidden_keys is not None:
            key_ok = key_ok & ~req.hidden_keys.gather(1, kept)
        diag_rows = ~key_ok
        if req.pruned:
            pos_ids = kwargs.get("position_ids")
            if self._positions_mode(req) == "renumber":
                new_pos = self._renumbered(req, pos_ids)
                sub["position_ids"] = new_pos
                hidden_ref = kwargs["position_embeddings"][0]
                sub["position_embeddings"] = self.adapter.text_model.rotary_emb(hidden_ref, new_pos)
            else:
                cos, sin = kwargs["position_embeddings"]
                sub["position_embeddings"] = (_gather_seq(cos, kept), _gather_seq(sin, kept))
                if pos_ids is not None:
                    sub["position_ids"] = _gather_last(pos_ids, kept)
            if mask is not None:
                mask = M.gather_keys(mask, kept)
                if mask.dim() == 4:
                    mask = M.gather_queries(mask, kept)
        all_ok = req.all_slots_valid
        if mask is None:
            if all_ok:
                sub["attention_mask"] = None
                return sub
            if fmt == "2d":
                raise NotImplementedError("hiding keys of some samples needs a 4-D mask; flash attention "
                                          "supports inplace pruning only")
            idx = torch.arange(kept.shape[1], device=kept.device).unsqueeze(0).expand(req.batch, -1)
            dtype = kwargs["position_embeddings"][0].dtype
            mask = M.to_backend(M.causal_allowed(idx, idx), fmt, dtype)
        if not all_ok:
            if mask.dim() == 2 and req.hidden_keys is not None:
                raise NotImplementedError("mask mode needs a 4-D attention mask (sdpa or eager), "
                                          "not flash attention")
            mask = M.restrict_keys(mask, key_ok, diag_rows if mask.dim() == 4 else None)
        sub["attention_mask"] = mask
        return sub

    def _renumbered(self, req: Request, pos_ids: torch.Tensor | None) -> torch.Tensor:
        if pos_ids is None or pos_ids.dim() != 2:
            raise NotImplementedError("positions='renumber' needs 1-D RoPE position ids")
        pos = pos_ids.expand(req.batch, -1)
        return pos.gather(1, req.kept) - req.dropped_cum.gather(1, req.kept)

def _to_original(req: Request, values: torch.Tensor, absent) -> torch.Tensor:
    """Scatter per-slot bools (B, Lcur) to original positions (B, L); positions without a slot get `absent`."""
    out = torch.full((req.batch, req.length + 1), absent, dtype=values.dtype, device=values.device)
    index = torch.where(req.valid, req.kept, torch.full_like(req.kept, req.length))  # filler -> dummy column
    out.scatter_(1, index, values)
    return out[:, :req.length]


def _gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather along dim -2 (sequence) of cos/sin shaped (..., B|1, L, D) with per-sample idx (B, L')."""
    B, Lp = idx.shape
    lead = t.shape[:-3]
    t = t.expand(*lead, B, t.shape[-2], t.shape[-1])
    index = idx.view(*([1] * len(lead)), B, Lp, 1).expand(*lead, B, Lp, t.shape[-1])
    return t.gather(-2, index)


def _gather_last(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather position ids (..., B|1, L) along the last axis (all rows for M-RoPE)."""
    B, Lp = idx.shape
    lead = t.shape[:-2]
    t = t.expand(*lead, B, t.shape[-1])
    index = idx.view(*([1] * len(lead)), B, Lp).expand(*lead, B, Lp)
    return t.gather(-1, index)
