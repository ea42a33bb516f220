"""`ModelContext`: the per-model hooks every method family shares (reference counted).

- records the current forward's `input_ids` (a VLM's text model only sees embeddings) and whether the
  forward is a fresh prefill (empty cache) or continues a cache;
- `ensure_tracked_cache()`: gives a method a `TrackedCache` for the prefill (a caller's empty
  `DynamicCache` is adopted in place, so the caller sees what was stored);
- on continuations of a `TrackedCache` (decode steps, later turns, chunked prefill): fills missing
  position ids from the logical length, refuses inputs whose positions disagree with it, and translates
  the model's logical attention mask (sized by `TrackedCache.get_mask_sizes`) into each tracked layer's
  stored slots, hiding invalid slots and shifting renumbered positions.
Token pruning changes a prefill's own layers; KV compression changes what each layer stores: both
leave the bookkeeping in the `TrackedCache`, and this one translator reads it for every family.
"""
from __future__ import annotations

from typing import Any

import torch

from . import attachments
from . import masks as M
from .attention import inner_name
from .cache import TrackedCache, TrackedLayer
from .threads import ForwardGuard



class ModelContext:
    def __init__(self, adapter):
        self.adapter = adapter
        self.users = 0
        self.input_ids: torch.Tensor | None = None  # ids of the current forward (None if unknown)
        self.fresh = False  # the current forward starts from an empty cache (or has none)
        self._entry_ids: torch.Tensor | None = None
        self._memo: dict = {}
        self._plain = False
        self.host_values = HostValues()
        text = adapter.text_model
        # concurrent forwards from two threads would share this object's per-forward state: refused
        self._handles = ForwardGuard(adapter.model).install(*dict.fromkeys((adapter.model, text)))
        if adapter.model is not text:
            self._handles.append(adapter.model.register_forward_pre_hook(self._on_entry, with_kwargs=True))
        self._handles.append(text.register_forward_pre_hook(self._on_text_model, with_kwargs=True))
        for i, layer in enumerate(adapter.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def acquire(cls, adapter) -> "ModelContext":
        ctx = attachments.attached(adapter.text_model, attachments.CONTEXT)
        if ctx is None:
            ctx = cls(adapter)
            attachments.attach(adapter.text_model, attachments.CONTEXT, ctx)
        ctx.users += 1
        return ctx

    @classmethod
    def of(cls, adapter) -> "ModelContext | None":
        """The context attached to this model, if any method uses one."""
        return attachments.attached(adapter.text_model, attachments.CONTEXT)

    def announce_input_ids(self, ids: torch.Tensor | None) -> None:
        """The ids of the next text-model forward, for callers that run the text model directly with
        `inputs_embeds` (the fast prefill): what the wrapper's entry hook records otherwise."""
        self._entry_ids = ids

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        for h in self._handles:
            h.remove()
        attachments.detach(self.adapter.text_model, attachments.CONTEXT, self)

    @property
    def inner_impl(self) -> str:
        return inner_name(self.adapter.text_config._attn_implementation)

    # ----------------------------------------------------------------- forward bookkeeping
    def _on_entry(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._entry_ids = ids if isinstance(ids, torch.Tensor) else None
        if self.adapter.uses_mrope and kwargs.get("position_ids") is None and isinstance(ids, torch.Tensor):
            cache = kwargs.get(self.adapter.cache_kwarg)
            if isinstance(cache, TrackedCache) and cache.logical_length != cache.get_seq_length():
                kwargs["position_ids"] = self.adapter.continuation_position_ids(
                    cache.logical_length, ids.shape[1], ids.shape[0], ids.device)
                return args, kwargs
        return None

    def _on_text_model(self, module, args, kwargs):
        self._memo = {}
        self._plain = False
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = self._entry_ids
        self._entry_ids = None
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if ref is not None and ids is not None and ids.shape[:2] != ref.shape[:2]:
            ids = None  # the ids do not describe this forward (embeddings passed directly)
        self.input_ids = ids
        cache = kwargs.get(self.adapter.cache_kwarg)
        if cache is not None and not hasattr(cache, "get_seq_length"):
            cache = None
        past = 0
        if cache is not None:
            past = cache.logical_length if isinstance(cache, TrackedCache) else cache.get_seq_length()
        self.fresh = past == 0
        if past == 0 or ref is None or not isinstance(cache, TrackedCache):
            return None
        return self._continue(cache, args, kwargs, ref.shape[1], ref.device)

    def _continue(self, cache: TrackedCache, args, kwargs, q: int, device):
        # layers then need work only for a mask to translate, invalid slots or shifted positions
        self._plain = not any(
            isinstance(layer, TrackedLayer) and (layer.prefix_valid is not None or layer.position_shift is not None)
            for layer in cache.layers)
        start = cache.logical_length
        pos = kwargs.get("position_ids")
        if q > 1 and isinstance(pos, torch.Tensor) and not self.adapter.uses_mrope and _unpadded(kwargs):
            # a multi-token continuation (next turn); single decode steps skip this check to avoid a GPU sync
            first = int(pos.reshape(-1, pos.shape[-1])[:, 0].min())
            if first != start:
                raise ValueError(
                    f"position_ids start at {first} but the cache has seen {start} tokens: pass only the new "
                    f"tokens (generate() re-slices inputs by the stored length of layer 0, which pruning or "
                    f"compression shortened); continue with model(input_ids=new_tokens, cache=..., position_ids=...)")
        if pos is None and not self.adapter.uses_mrope:
            kwargs["position_ids"] = torch.arange(start, start + q, device=device).unsqueeze(0)
            return args, kwargs
        return None

    def prompt_lengths(self, kwargs: dict[str, Any], batch: int, length: int, what: str) -> list[int]:
        """At a fresh prefill: real (unpadded) tokens per sample from the 2-D attention mask; right padding
        raises, naming the method (`what`)."""
        mask2d = kwargs.get("attention_mask")
        if not (isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 and mask2d.shape[1] == length):
            return [length] * batch
        right_padded, lengths = self.host_values.read(
            "prompt_lengths", lambda: (bool((mask2d[:, -1] == 0).any()), mask2d.sum(1).tolist()))
        if length > 1 and right_padded:
            raise ValueError(f"attention_mask: right padding is not supported by {what}; "
                             "pad on the left (tokenizer.padding_side = 'left')")
        return list(lengths)

    def ensure_tracked_cache(self, kwargs: dict[str, Any], what: str) -> TrackedCache | None:
        """At a fresh prefill: the TrackedCache the forward will fill (None when no cache is used)."""
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.adapter.text_config, "use_cache", True)
        if not use_cache:
            return None
        ck = self.adapter.cache_kwarg
        cache = kwargs.get(ck)
        if cache is None:
            cache = TrackedCache(config=self.adapter.text_config)
            kwargs[ck] = cache
        elif type(cache).__name__ == "DynamicCache":
            cache = TrackedCache.adopt(cache, self.adapter.num_layers)
        elif not isinstance(cache, TrackedCache):
            raise NotImplementedError(
                f"{what} needs a dynamic KV cache; got {type(cache).__name__} "
                "(StaticCache and quantized caches are not supported; use cache_implementation='dynamic')")
        return cache

    # ----------------------------------------------------------------- decoder layers (continuations)
    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            if self.fresh:
                return None
            if self._plain and kwargs.get("attention_mask") is None:
                return None
            cache = kwargs.get(self.adapter.cache_kwarg)
            if isinstance(cache, TrackedCache) and i < len(cache.layers):
                layer = cache.layers[i]
                if isinstance(layer, TrackedLayer) and layer.is_tracked:
                    return self._translate(layer, args, kwargs)
            return None

        return hook

    def _translate(self, layer: TrackedLayer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        B, q = hidden.shape[0], hidden.shape[1]
        mask = kwargs.get("attention_mask")
        key = (id(layer.prefix_pos), id(layer.prefix_valid), layer.get_seq_length(), q, id(mask))
        sub = self._memo.get(key)
        if sub is None:
            sub = self._substitute(layer, hidden, kwargs, B, q)
            self._memo[key] = sub
        if not sub:
            return None
        new_kwargs = dict(kwargs)
        new_kwargs.update(sub)
        return args, new_kwargs

    def _substitute(self, layer: TrackedLayer, hidden, kwargs, B: int, q: int) -> dict:
        sub: dict[str, Any] = {}
        mask = kwargs.get("attention_mask")
        valid = layer.slot_valid(extra=q)
        past = layer.logical_length()
        if mask is not None or valid is not None:
            cols = layer.slot_positions(extra=q, batch=B, device=hidden.device)
            cols = cols.expand(B, *cols.shape[1:])
            if cols.dim() == 3:  # per-KV-head slots: masks become (B, H, q, S)
                groups = self._kv_groups()
                cols = M.expand_kv_heads(cols, groups)
                valid = None if valid is None else M.expand_kv_heads(valid.expand(B, *valid.shape[1:]), groups)
        if mask is not None:
            if mask.shape[-1] != past + q:
                raise RuntimeError(f"attention mask covers {mask.shape[-1]} keys, expected {past + q} "
                                   "(logical length of the tracked cache + new tokens)")
            mask = M.gather_keys(mask, cols)
            if valid is not None:
                mask = M.restrict_keys(mask, valid)
            sub["attention_mask"] = mask
        elif valid is not None:  # a layer stores prefix_valid only when some slot is invalid
            fmt = M.mask_format(None, self.inner_impl)
            if fmt == "2d":
                if valid.dim() == 3:
                    raise NotImplementedError("per-head KV slots with filler slots (AdaKV, padded batches) need "
                                              "attn_implementation 'sdpa' or 'eager', not flash attention")
                sub["attention_mask"] = valid.to(torch.long)
            else:
                q_pos = torch.arange(past, past + q, device=hidden.device).unsqueeze(0).expand(B, -1)
                key_ok = valid[:, :, None, :] if valid.dim() == 3 else valid[:, None, None, :]
                allowed = M.causal_allowed(q_pos, cols) & key_ok
                sub["attention_mask"] = M.to_backend(allowed, fmt, hidden.dtype)
        if layer.position_shift is not None:
            pos_ids = kwargs.get("position_ids")
            if pos_ids is None:
                pos_ids = torch.arange(past, past + q, device=hidden.device).unsqueeze(0)
            new_pos = pos_ids.expand(B, -1) - layer.position_shift.to(pos_ids.device).unsqueeze(1)
            sub["position_ids"] = new_pos
            sub["position_embeddings"] = self.adapter.text_model.rotary_emb(hidden, new_pos)
        return sub

    def _kv_groups(self) -> int:
        cfg = self.adapter.text_config
        heads = cfg.num_attention_heads
        return heads // (getattr(cfg, "num_key_value_heads", None) or heads)


class HostValues:
    """The host-side values (GPU -> CPU reads) a prefill's hooks take from device tensors, routed through one
    place so a graph-captured prefill (`fast.prefill`) can run them without a synchronisation: an eager run
    `record`s them in call order, the capture of the same inputs `replay`s them. Outside those two modes a
    read simply computes. Only values that depend on the prompt's shape, visual-token layout and padding may be
    read this way (they are the graph cache's key); anything else must stay on the device."""

    def __init__(self):
        self._mode: str | None = None
        self._values: list = []

    def read(self, name: str, compute):
        if self._mode == "replay":
            if not self._values:
                raise RuntimeError(f"host value {name!r} was not recorded by the eager run of this prefill")
            recorded, value = self._values.pop(0)
            if recorded != name:
                raise RuntimeError(f"host values read out of order: {name!r} where {recorded!r} was recorded")
            return value
        value = compute()
        if self._mode == "record":
            self._values.append((name, value))
        return value

    def record(self) -> None:
        self._mode, self._values = "record", []

    def take(self) -> list:
        """End recording: the values read, in call order."""
        values, self._mode, self._values = self._values, None, []
        return values

    def replay(self, values: list) -> None:
        self._mode, self._values = "replay", list(values)

    def finish(self) -> None:
        """End a replay; every recorded value must have been read."""
        left, self._mode, self._values = self._values, None, []
        if left:
            raise RuntimeError(f"{len(left)} recorded host values were not read again: {[n for n, _ in left]}")


def _unpadded(kwargs) -> bool:
    mask2d = kwargs.get("attention_mask")
    return mask2d is None or (isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 and bool(mask2d.all()))
