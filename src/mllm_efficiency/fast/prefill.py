"""One prompt shape's fast path: a prefill that writes the slot buffers, and the decode step on them.

A `ShapePlan` belongs to one key (`fast.session`): the text model's input shapes, the visual-token layout,
the padding, the decode capacity and the attached methods. It holds
- static copies of the text model's tensor inputs (the merged `inputs_embeds`, masks, position ids),
- the slot buffers decoding reads (`fast.slots`), filled by the prefill itself,
- on CUDA, two graphs: the prefill (every decoder layer with the methods' hooks, final norm, LM head on the
  last row, the copy of each layer's kept K/V into its slots) and one decode step (which also writes the
  greedy token it chose into the step's input, so a decode loop is one replay per token).
A graph is captured the second time its key is seen (the first run is eager and records the host values the
methods read, `core.context.HostValues`); a capture that fails (a method reads the device from the host in a
way the key does not determine) leaves the plan eager for good, with the reason kept in `eager_reason`.
On CPU everything runs eagerly through the same functions.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from ..core.context import ModelContext
from .decode import _compiled_step, _step_forward
from .graphs import capture, side_stream
from .slots import SlotCache, SlotLayer, register_slot_attention, set_layer_bias, slot_contents


class ShapePlan:
    def __init__(self, session, key, text_inputs: dict, entry_ids, padded: bool, capacity_extra: int):
        self.session = session
        self.key = key
        self.adapter = session.adapter
        self.inputs = {k: v.clone() for k, v in text_inputs.items() if isinstance(v, torch.Tensor)}
        self.options = {k: v for k, v in text_inputs.items() if not isinstance(v, torch.Tensor)}
        self.entry_ids = None if entry_ids is None else entry_ids.clone()
        self.padded = padded
        self.capacity_extra = capacity_extra
        ref = self.inputs.get("inputs_embeds", self.inputs.get("input_ids"))
        self.batch, self.length = ref.shape[0], ref.shape[1]
        self.device = ref.device
        self.cache: SlotCache | None = None
        self.logits: torch.Tensor | None = None
        self.step_ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.step_pos: torch.Tensor | None = None
        self.pos_shift: torch.Tensor | None = None  # (B, 1) tokens a renumbering step removed per row
        self.step_count = torch.zeros(1, dtype=torch.long, device=self.device)
        self.step_logits: torch.Tensor | None = None
        self.host_values: list = []
        self.stats_snapshot: list = []
        self.prefill_graph = None
        self.step_graph = None
        self.eager_reason: str | None = None
        self.runs = 0

    # ------------------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, text_inputs: dict, entry_ids) -> torch.Tensor:
        """Run the prompt (copied into the static inputs); returns the last position's logits (B, V)."""
        for k, t in self.inputs.items():
            t.copy_(text_inputs[k])
        if self.entry_ids is not None:
            self.entry_ids.copy_(entry_ids)
        self.runs += 1
        if self.prefill_graph is not None:
            self.prefill_graph.replay()
            self._restore_stats()
            return self.logits
        will_capture = self.runs >= 2 and self._can_capture()
        ctx = ModelContext.of(self.adapter)
        if ctx is not None:
            ctx.host_values.record()
        try:
            with side_stream(will_capture):  # a capture's warm-up runs on a side stream
                logits = self._prefill_body()
        finally:
            self.host_values = ctx.host_values.take() if ctx is not None else []
        if will_capture:
            self._capture_prefill()
        return logits

    def _prefill_body(self) -> torch.Tensor:
        adapter = self.adapter
        ctx = ModelContext.of(adapter)
        if ctx is not None:
            ctx.announce_input_ids(self.entry_ids)
        cache = DynamicCache(config=adapter.text_config)
        kwargs = dict(self.options)
        kwargs.update(self.inputs)
        kwargs[adapter.cache_kwarg] = cache
        kwargs["use_cache"] = True
        with self.session.fused():
            out = adapter.text_model(**kwargs)
            hidden = out.last_hidden_state[:, -1]
            logits = self.session.lm_head(hidden)
        mask2d = self.inputs.get("attention_mask") if self.padded else None
        shift = _uniform_position_shift(cache.layers)
        contents = [slot_contents(cache.layers[i], mask2d, self.batch, allow_shift=shift is not None)
                    for i in range(adapter.num_layers)]
        if shift is not None:  # a layer-0 step renumbered the positions of every layer: decode continues from there
            if self.pos_shift is None:
                self.pos_shift = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
            self.pos_shift.copy_(shift.view(-1, 1).expand(self.batch, 1))
        if self.cache is None:
            self.step_count.zero_()
            layers = [SlotLayer(k, v, valid, k.shape[-2] + self.capacity_extra, self.step_count)
                      for k, v, valid in contents]
            self.cache = SlotCache(layers, self.length)
        else:
            for slot, (k, v, valid) in zip(self.cache.layers, contents):
                slot.load(k, v, valid)
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        return self.logits

    def _can_capture(self) -> bool:
        return (self.session.cuda_graph and self.device.type == "cuda" and self.eager_reason is None)

    def _capture_prefill(self) -> None:
        ctx = ModelContext.of(self.adapter)
        graph = torch.cuda.CUDAGraph()
        try:
            if ctx is not None:
                ctx.host_values.replay(self.host_values)
            with torch.cuda.graph(graph):
                self._prefill_body()
            if ctx is not None:
                ctx.host_values.finish()
        except Exception as e:  # noqa: BLE001 - any failure of a capture means: stay eager, say why
            if ctx is not None:
                ctx.host_values.take()
            self.eager_reason = f"prefill capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            self.session.notice(f"fast path: {self.eager_reason}; this prompt shape runs its prefill eagerly")
            torch.cuda.synchronize()
            return
        self.prefill_graph = graph
        self.stats_snapshot = self.session.snapshot_stats()

    def _restore_stats(self) -> None:
        for obj, fields in self.stats_snapshot:
            vars(obj).update(fields)

    # ------------------------------------------------------------------------------------------- decode
    @torch.inference_mode()
    def start_decode(self, first_positions: torch.Tensor, first_ids: torch.Tensor) -> None:
        if self.pos_shift is not None:
            first_positions = first_positions - self.pos_shift
        if self.step_pos is None:
            self.step_pos = first_positions.clone()
            self._pos0 = first_positions.clone()
        else:
            self.step_pos.copy_(first_positions)
            self._pos0.copy_(first_positions)
        self.step_count.zero_()
        self.step_ids.copy_(first_ids)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One greedy decode step: the logits (B, V) for the token after `step_ids`; `step_ids` then holds the
        argmax (the next step's input)."""
        if self.step_graph is None and self.device.type == "cuda" and self.session.cuda_graph:
            self._capture_step()
        if self.step_graph is not None:
            self.step_graph.replay()
            return self.step_logits
        return self._step_body()

    def _step_body(self) -> torch.Tensor:
        adapter = self.adapter
        text_config = adapter.text_config
        saved = text_config._attn_implementation
        text_config._attn_implementation = register_slot_attention(self.session.attention)
        set_layer_bias(adapter.attention_modules(), self.cache.layers)
        try:
            self.cache.logical_length = self.length  # informational: positions are explicit
            forward = _compiled_step() if self.session.compile else _step_forward
            with self.session.fused():
                logits = forward(adapter.text_model, self.session.lm_head, self.cache, self.step_ids, self.step_pos,
                                 adapter.cache_kwarg)
        finally:
            text_config._attn_implementation = saved
            set_layer_bias(adapter.attention_modules(), None)
        self.step_count.add_(1)
        self.step_pos.add_(1)
        self.step_ids.copy_(logits.argmax(-1, keepdim=True))
        return logits

    def _capture_step(self) -> None:
        saved = (self.step_ids.clone(), self.step_pos.clone())
        self.step_graph, self.step_logits = capture(self._step_body, 2, lambda: self._rewind(*saved))

    def _rewind(self, ids, pos) -> None:
        self.step_count.zero_()
        self.step_ids.copy_(ids)
        self.step_pos.copy_(pos)
        for layer in self.cache.layers:
            layer.forget_from(0)

    # ------------------------------------------------------------------------------------------- info
    @property
    def stored_lengths(self) -> list[int]:
        return [] if self.cache is None else [layer.stored for layer in self.cache.layers]

    @property
    def kv_bytes(self) -> int:
        return 0 if self.cache is None else sum(layer.stored_bytes for layer in self.cache.layers)

    @property
    def path(self) -> str:
        """How the last prefill ran: 'graph' or 'eager'."""
        return "graph" if self.prefill_graph is not None else "eager"


def _uniform_position_shift(layers):
    """The per-row position shift when every layer's positions were renumbered by the same step (a step at
    layer 0, e.g. the vision-side methods); None when no layer was renumbered. Layers renumbered from a later
    layer on (FastV positions='renumber') decode at different positions per layer: `slot_contents` refuses them."""
    from ..core.cache import TrackedLayer

    shifts = [getattr(layer, "position_shift", None) if isinstance(layer, TrackedLayer) else None for layer in layers]
    if shifts and all(s is not None for s in shifts) and all(s is shifts[0] for s in shifts):
        return shifts[0]
    return None
