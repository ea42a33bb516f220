"""`FastDecoder`: greedy decoding on static per-layer slot buffers, replayed as one CUDA graph per step.

    dec = FastDecoder(model, max_new_tokens=64)     # methods may be attached to `model` before or after
    logits = dec.prefill(**inputs)                  # an ordinary forward: every attached method runs as usual
    for _ in range(63):
        logits = dec.step(logits.argmax(-1, keepdim=True))
    dec.close()

The prefill's cache, whatever each layer kept (FastV's pruned layers, a KV method's budget per layer or per KV
head, invalid padding slots), is copied into fixed buffers (`fast.slots`). A decode step runs the stock text
model on one token with those buffers as its cache and `slot_attention` as its attention function, so on a
GPU the whole step (embedding, every layer, final norm, LM head) is captured once and replayed: no Python, no
kernel-launch overhead, and the time tracks the bytes read (weights + stored KV).
Out of scope, refused with a clear error: decode-time eviction (`decode != 'none'`), sliding-window layers,
FastV's `positions='renumber'`, models without an LM head.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from ..adapters import get_adapter
from ..core import attachments
from ..core.cache import TrackedCache
from ..errors import ConfigError
from .fuse import ProjectionFusion
from .graphs import capture
from .slots import (ATTENTION_KINDS, SlotCache, SlotLayer, default_attention, register_slot_attention, set_layer_bias,
                    slot_contents)


class FastDecoder:
    def __init__(self, model, max_new_tokens: int, cuda_graph: bool = True, compile: bool = False,
                 attention: str | None = None, fuse_projections: bool = True):
        """`cuda_graph`: capture the step once and replay it (CUDA devices only). `compile`: run the step through
        `torch.compile` first (fuses the norms, RoPE and elementwise ops into fewer kernels; tens of seconds of
        compilation per prefill shape). `attention`: 'sdpa' (torch SDPA grouped by KV head), 'matmul' (grouped
        matmuls, fp32 softmax) or 'sdpa-expand' (SDPA with enable_gqa); default `slots.default_attention`.
        `fuse_projections`: decode steps run each layer's q/k/v and gate/up projections as one GEMV each
        (`fast.fuse`; the parameters are views of the fused weights until `close()`)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if attention is not None and attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {list(ATTENTION_KINDS)}, got {attention!r}")
        self.compile = compile
        self.fuse_projections = fuse_projections
        self._fusion: ProjectionFusion | None = None
        self.model = model
        self.adapter = get_adapter(model)
        self.attention = attention or default_attention(self.adapter.text_config)
        self.max_new_tokens = max_new_tokens
        self.cuda_graph = cuda_graph
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise NotImplementedError(f"{type(model).__name__} has no LM head; FastDecoder needs a model that "
                                      "returns logits (a *ForCausalLM or *ForConditionalGeneration class)")
        if self.adapter.sliding_window_layers():
            raise NotImplementedError("FastDecoder supports full-attention layers only (this model has "
                                      f"sliding-window layers {self.adapter.sliding_window_layers()})")
        self.cache: SlotCache | None = None
        self.steps = 0
        self._graph = None
        self._ids = self._pos = self._step = self._logits = None

    # ------------------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, **inputs) -> torch.Tensor:
        """Run the prompt through the model (with whatever methods are attached) and set up the slot buffers.
        Returns the last position's logits (B, V)."""
        self._check_no_decode_eviction()
        self.close()
        ids = inputs.get("input_ids")
        ref = ids if ids is not None else inputs.get("inputs_embeds")
        if ref is None:
            raise ValueError("prefill needs input_ids or inputs_embeds")
        B, L = ref.shape[0], ref.shape[1]
        mask2d = inputs.get("attention_mask")
        padded = isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 and bool((mask2d == 0).any())
        if padded and bool((mask2d[:, -1] == 0).any()):
            raise ValueError("attention_mask: right padding is not supported; pad on the left")
        kwargs = dict(inputs)
        if padded and kwargs.get("position_ids") is None and not self.adapter.uses_mrope:
            # what generate() does: positions count only the real tokens of each row
            kwargs["position_ids"] = (mask2d.long().cumsum(-1) - 1).masked_fill(mask2d == 0, 1)
        cache = DynamicCache(config=self.adapter.text_config)
        kwargs[self.adapter.cache_kwarg] = cache
        out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        logical = cache.logical_length if isinstance(cache, TrackedCache) else cache.get_seq_length()
        if logical != L:
            raise RuntimeError(f"the prefill stored a logical length of {logical} tokens for a {L}-token prompt")
        device = ref.device
        self._step = torch.zeros(1, dtype=torch.long, device=device)
        layers = [self._slot_layer(cache, i, mask2d if padded else None, B) for i in range(self.adapter.num_layers)]
        logits = out.logits[:, -1]
        del cache, out  # the dynamic cache's tensors were freed layer by layer in _slot_layer
        self.cache = SlotCache(layers, L)
        self._pos = self._first_positions(kwargs.get("position_ids"), B, L, device)
        self._pos0 = self._pos.clone()
        self._ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        if self.cuda_graph and device.type == "cuda":
            self._capture()
        return logits

    def _slot_layer(self, cache, i: int, mask2d, B: int) -> SlotLayer:
        layer = cache.layers[i]
        keys, values, valid = slot_contents(layer, mask2d, B)
        slot = SlotLayer(keys, values, valid, keys.shape[-2] + self.max_new_tokens, self._step)
        layer.keys = layer.values = None  # free the dynamic copy as soon as the slot copy exists
        return slot

    def _first_positions(self, position_ids, B: int, L: int, device) -> torch.Tensor:
        if self.adapter.uses_mrope:
            return self.adapter.continuation_position_ids(L, 1, B, device)
        if isinstance(position_ids, torch.Tensor):
            return position_ids[..., -1:].expand(B, 1).clone() + 1
        return torch.full((B, 1), L, dtype=torch.long, device=device)

    def _check_no_decode_eviction(self) -> None:
        engine = attachments.kv_engine(self.adapter)
        policy = getattr(engine, "policy", None)
        if policy is not None and policy.config.decode != "none":
            raise NotImplementedError(
                f"FastDecoder keeps the prefill's cache and appends; {policy.name} with decode="
                f"{policy.config.decode!r} evicts during decoding, which it does not do. Use decode='none' "
                "or the ordinary generate() loop")

    # ------------------------------------------------------------------------------------------- decode
    @torch.inference_mode()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append `next_ids` (B, 1) and return the logits (B, V) for the token after it."""
        if self.cache is None:
            raise RuntimeError("call prefill() before step()")
        if self.steps >= self.max_new_tokens:
            raise RuntimeError(f"the slot buffers hold max_new_tokens={self.max_new_tokens} decode steps; "
                               "create the FastDecoder with a larger max_new_tokens")
        if next_ids.shape != self._ids.shape:
            raise ValueError(f"next_ids must have shape {tuple(self._ids.shape)}, got {tuple(next_ids.shape)}")
        self._ids.copy_(next_ids)
        self.steps += 1
        if self._graph is not None:
            self._graph.replay()
            return self._logits.clone()
        return self._run_step()

    @torch.inference_mode()
    def generate(self, max_new_tokens: int | None = None, **inputs) -> torch.Tensor:
        """Greedy decoding: the (B, n) new tokens (n = max_new_tokens, default the decoder's)."""
        n = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if n > self.max_new_tokens + 1:
            raise ValueError(f"max_new_tokens must be <= {self.max_new_tokens + 1} for this decoder, got {n}")
        logits = self.prefill(**inputs)
        tokens = [logits.argmax(-1, keepdim=True)]
        try:
            for _ in range(n - 1):
                tokens.append(self.step(tokens[-1]).argmax(-1, keepdim=True))
        finally:
            self._unfuse()
        return torch.cat(tokens, dim=1)

    def _run_step(self) -> torch.Tensor:
        """One decode step on the static inputs; every tensor it touches keeps its address across steps."""
        text_config = self.adapter.text_config
        saved = text_config._attn_implementation
        text_config._attn_implementation = register_slot_attention(self.attention)
        set_layer_bias(self.adapter.attention_modules(), self.cache.layers)
        if self.fuse_projections and self._fusion is None:
            with torch.inference_mode(False), torch.no_grad():  # ordinary parameters, usable by autograd later
                self._fusion = ProjectionFusion(self.adapter.layers)
        fused = self._fusion.active() if self._fusion is not None else contextlib.nullcontext()
        try:
            self.cache.logical_length = self._logical_now()
            forward = _compiled_step() if self.compile else _step_forward
            with fused:
                logits = forward(self.adapter.text_model, self.lm_head, self.cache, self._ids, self._pos,
                                 self.adapter.cache_kwarg)
        finally:
            text_config._attn_implementation = saved
            set_layer_bias(self.adapter.attention_modules(), None)
        self._step.add_(1)
        self._pos.add_(1)
        return logits

    def _logical_now(self) -> int:
        return self.cache.layers[0].stored + self.steps  # informational for the model; positions are explicit

    def _capture(self) -> None:
        self._graph, self._logits = capture(self._run_step, 2, self._rewind)

    def _rewind(self) -> None:
        self._step.zero_()
        self._pos.copy_(self._pos0)
        for layer in self.cache.layers:
            layer.forget_from(0)

    # ------------------------------------------------------------------------------------------- info
    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV the prefill stored (every layer's slots, filler slots included)."""
        return 0 if self.cache is None else sum(layer.stored_bytes for layer in self.cache.layers)

    @property
    def stored_lengths(self) -> list[int]:
        return [] if self.cache is None else [layer.stored for layer in self.cache.layers]

    def close(self) -> None:
        """Free the slot buffers and the captured graph; unfuse the projections."""
        self._graph = None
        self._unfuse()
        self.cache = None
        self.steps = 0
        self._ids = self._pos = self._logits = None


    def _unfuse(self) -> None:
        # the graph reads the fused weights: it goes with them (a later step() captures a new one)
        if self._fusion is not None:
            self._graph = None
            with torch.inference_mode(False), torch.no_grad():
                self._fusion.restore()
            self._fusion = None


def _step_forward(text_model, lm_head, cache, ids, pos, cache_kwarg: str) -> torch.Tensor:
    out = text_model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kwarg: cache})
    return lm_head(out.last_hidden_state[:, -1])


_COMPILED: list = []


def _compiled_step():
    # One compiled function for every decoder: a new model or new buffer sizes cost a recompilation (dynamo
    # marks the sizes that changed dynamic after the first one), not a new function per decoder.
    if not _COMPILED:
        _COMPILED.append(torch.compile(_step_forward))
    return _COMPILED[0]

