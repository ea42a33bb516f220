"""`FastSession`: the fast generate path of one model, kept between calls.

    tokens = session_for(model).generate(inputs, max_new_tokens=32)     # what mllm_efficiency.generate runs

Each call
1. runs the model's own forward up to its text model (vision tower, projector, placeholder scatter, M-RoPE
   positions: whatever the wrapper computes) and stops there, keeping the text model's inputs;
2. reads, in one host synchronisation, the visual-token layout and the padding of the prompt;
3. finds the `ShapePlan` of the key (input shapes, visual layout, padding, decode capacity, attached
   methods), or makes one (least recently used plans are dropped beyond `max_plans`);
4. runs the plan's prefill (a CUDA graph from the second call of a key on) and greedy decode steps (one graph
   replay each) until every row has produced an end-of-sequence token or `max_new_tokens` are done.
The session fuses each layer's q/k/v and gate/up projections once (`fast.fuse`; the parameters become views
of the fused weights) and keeps them fused while it lives: `release(model)` (or `mllm_efficiency.fast.release`)
gives every parameter its own storage back and frees the graphs and buffers; `model.state_dict()` (and so
`save_pretrained`) releases the session first.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import weakref

import torch

from ..adapters import get_adapter
from ..core.attachments import own_attributes
from transformers import DynamicCache
from .fuse import ProjectionFusion
from .prefill import ShapePlan
from .slots import ATTENTION_KINDS, default_attention
from .support import capture_blocker

log = logging.getLogger("mllm_efficiency.fast")

_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
CAPACITY_STEP = 64  # decode slots are allocated in multiples of this (max_new_tokens 1..64 share a plan)


class _Stop(Exception):
    pass


def session_for(model, **options) -> "FastSession":
    """The model's session (created on first use; `options` apply when it is created)."""
    session = _SESSIONS.get(model)
    if session is None:
        session = FastSession(model, **options)
        _SESSIONS[model] = session
    return session


def release(model) -> None:
    """Drop the model's fast-path session: graphs, slot buffers, fused projections (parameters get their own
    storage back). Safe to call when there is none."""
    session = _SESSIONS.pop(model, None)
    if session is not None:
        session.close()


class FastSession:
    def __init__(self, model, max_plans: int = 8, attention: str | None = None, fuse_projections: bool = True,
                 cuda_graph: bool = True, compile: bool = False):
        """`attention`: the decode step's slot attention ('sdpa', 'matmul', 'sdpa-expand'; default: the one
        measured fastest for the model's head layout). `compile`: run the decode step through `torch.compile`
        before its capture (fuses norms, RoPE and elementwise ops; tens of seconds once per decode shape)."""
        if attention is not None and attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {list(ATTENTION_KINDS)}, got {attention!r}")
        if not isinstance(max_plans, int) or max_plans < 1:
            raise ValueError(f"max_plans must be an integer >= 1, got {max_plans!r}")
        self.model = model
        self.adapter = get_adapter(model)
        self.lm_head = model.get_output_embeddings()
        self.attention = attention or default_attention(self.adapter.text_config)
        self.compile = compile
        self.cuda_graph = cuda_graph
        self.max_plans = max_plans
        self.plans: "collections.OrderedDict" = collections.OrderedDict()
        self._fingerprint = None
        self._fusion: ProjectionFusion | None = None
        self._fuse = fuse_projections
        self.notices: list[str] = []
        self.last_plan: ShapePlan | None = None
        model_ref = weakref.ref(model)
        self._state_hook = model.register_state_dict_pre_hook(
            lambda *args, **kw: release(model_ref()) if model_ref() is not None else None)

    # ------------------------------------------------------------------------------------------- support
    def unsupported_reason(self) -> str | None:
        """Why this model, with its attached methods, cannot take the fast path (None: it can)."""
        from .support import unsupported_reason

        return unsupported_reason(self.model, self.adapter, self.lm_head)

    def notice(self, text: str) -> None:
        if text not in self.notices:
            self.notices.append(text)
            log.warning(text)

    @contextlib.contextmanager
    def fused(self):
        if self._fuse and self._fusion is None:
            with torch.inference_mode(False), torch.no_grad():  # ordinary parameters, usable by autograd later
                self._fusion = ProjectionFusion(self.adapter.layers)
        with self._fusion.active() if self._fusion is not None else contextlib.nullcontext():
            yield

    def snapshot_stats(self) -> list:
        from .support import method_stats

        return [(obj, dict(vars(obj))) for obj in method_stats(self.adapter)]

    # ------------------------------------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, inputs: dict, max_new_tokens: int, eos_token_ids=(), pad_token_id: int | None = None,
                 stop=None, streamer=None) -> torch.Tensor:
        """Greedy decoding: (B, n) new tokens, n <= max_new_tokens (fewer when every row has ended). After a row's
        end-of-sequence token (or a `stop(row, tokens)` hit) its later tokens are `pad_token_id`."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("the fast path needs input_ids")
        if streamer is not None:
            streamer.put(ids.cpu())
        mask = inputs.get("attention_mask")
        if (isinstance(mask, torch.Tensor) and mask.dim() == 2 and inputs.get("position_ids") is None
                and not self.adapter.uses_mrope):
            # what generate() does: positions count only the real tokens of each (left-padded) row
            inputs = dict(inputs, position_ids=(mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1))
        text_inputs = self._text_inputs(inputs)
        plan = self._plan_for(text_inputs, ids, max_new_tokens)
        logits = plan.prefill(text_inputs, ids if plan.entry_ids is not None else None)
        self.last_plan = plan
        first = logits.argmax(-1, keepdim=True)
        B = first.shape[0]
        tokens = [first]
        eos = torch.tensor(sorted(set(eos_token_ids)), device=first.device) if eos_token_ids else None
        done = torch.zeros(B, 1, dtype=torch.bool, device=first.device)
        stopped_at = [None] * B  # step at which a stop condition ended each row (host-side checks)
        if streamer is not None:
            streamer.put(first.cpu())
        plan.start_decode(self._first_positions(text_inputs, plan), first)
        for t in range(max_new_tokens - 1):
            if eos is not None:
                done |= torch.isin(tokens[-1], eos)
            if stop is not None:
                for b in range(B):
                    if stopped_at[b] is None and stop(b, torch.cat(tokens, 1)[b]):
                        stopped_at[b] = t
            if (eos is not None or stop is not None) and self._all_done(done, stopped_at):
                break
            plan.step()
            tokens.append(plan.step_ids.clone())
            if streamer is not None:
                streamer.put(tokens[-1].cpu())
        if streamer is not None:
            streamer.end()
        return _pad_after_end(torch.cat(tokens, dim=1), eos, stopped_at, pad_token_id)

    @staticmethod
    def _all_done(done: torch.Tensor, stopped_at: list) -> bool:
        host = done[:, 0].tolist()  # the step's one synchronisation
        return all(a or s is not None for a, s in zip(host, stopped_at))

    def _text_inputs(self, inputs: dict) -> dict:
        """The keyword arguments the model's own forward hands its text model for `inputs` (the text model does
        not run). For a text LLM that is the ids, mask and positions as given."""
        text = self.adapter.text_model
        seen = {}

        def grab(module, args, kwargs):
            if args:
                kwargs = dict(kwargs, input_ids=args[0])
            seen.update(kwargs)
            raise _Stop

        handle = text.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        try:
            kw = dict(inputs)
            kw.pop("use_cache", None)
            self.model(**kw, use_cache=True, **{self.adapter.cache_kwarg: DynamicCache(config=self.adapter.text_config)})
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"{type(self.model).__name__} did not call its text model")
        for name in (self.adapter.cache_kwarg, "use_cache", "return_dict"):
            seen.pop(name, None)
        return seen

    def _plan_for(self, text_inputs: dict, ids: torch.Tensor, max_new_tokens: int) -> ShapePlan:
        mask = text_inputs.get("attention_mask")
        visual = self.adapter.visual_mask(ids)
        host = [t for t in (mask, visual) if isinstance(t, torch.Tensor) and t.dim() == 2]
        host = [t.cpu() for t in host]  # the prompt's one synchronisation
        padded = isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(host[0].all())
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not padded:
            text_inputs.pop("attention_mask")  # as generate() does for an all-ones mask: causal attention
        layout = tuple(_runs(row) for row in host[-1]) if visual is not None else None
        padding = tuple(int((row == 0).sum()) for row in host[0]) if padded else None
        capacity = -(-max_new_tokens // CAPACITY_STEP) * CAPACITY_STEP
        fingerprint = _method_fingerprint(self.adapter)
        if fingerprint != self._fingerprint:  # methods attached or removed: every plan is stale
            self.plans.clear()
            self._fingerprint = fingerprint
        shapes = tuple(sorted((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, repr(v))
                              for k, v in text_inputs.items()))
        key = (shapes, layout, padding, capacity)
        plan = self.plans.get(key)
        if plan is None:
            entry = ids if self._needs_ids() else None
            plan = ShapePlan(self, key, text_inputs, entry, padded, capacity)
            plan.eager_reason = capture_blocker(self.adapter)
            if plan.eager_reason is not None and self.cuda_graph and plan.device.type == "cuda":
                self.notice(f"fast path: {plan.eager_reason}; its prefill runs eagerly (decode steps are graphs)")
            self.plans[key] = plan
            while len(self.plans) > self.max_plans:
                self.plans.popitem(last=False)
        self.plans.move_to_end(key)
        return plan

    def _needs_ids(self) -> bool:
        from ..core.context import ModelContext

        return ModelContext.of(self.adapter) is not None

    def _first_positions(self, text_inputs: dict, plan: ShapePlan) -> torch.Tensor:
        B, L = plan.batch, plan.length
        if self.adapter.uses_mrope:
            return self.adapter.continuation_position_ids(L, 1, B, plan.device)
        pos = text_inputs.get("position_ids")
        if isinstance(pos, torch.Tensor):
            return pos[..., -1:].expand(B, 1).clone() + 1
        mask = text_inputs.get("attention_mask")
        if plan.padded and isinstance(mask, torch.Tensor):
            return mask.long().sum(-1, keepdim=True)  # generate(): positions count the real tokens
        return torch.full((B, 1), L, dtype=torch.long, device=plan.device)

    # ------------------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        self.plans.clear()
        self.last_plan = None
        if self._fusion is not None:
            with torch.inference_mode(False), torch.no_grad():
                self._fusion.restore()
            self._fusion = None
        self._state_hook.remove()


def _runs(row: torch.Tensor) -> tuple:
    """(start, length) of each run of True in a 1-D bool CPU tensor."""
    edges = torch.diff(torch.nn.functional.pad(row.to(torch.int8), (1, 1)))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return tuple((s, e - s) for s, e in zip(starts, ends))


def _method_fingerprint(adapter) -> tuple:
    """Changes whenever a method is attached or removed: the hooks on the modules methods hook into, the
    attention implementation and our attributes on the text model."""
    modules = [adapter.model, adapter.text_model, getattr(adapter.text_model, "norm", None), *adapter.layers,
               *adapter.attention_modules()]
    hooks = tuple(tuple(m._forward_pre_hooks) + tuple(m._forward_hooks) for m in modules if m is not None)
    attrs = tuple(sorted((k, id(v)) for k, v in own_attributes(adapter.text_model).items()))
    return hooks, attrs, adapter.text_config._attn_implementation


def _pad_after_end(tokens: torch.Tensor, eos, stopped_at: list, pad_token_id) -> torch.Tensor:
    """Tokens after a row's first end-of-sequence token, or after the token that completed a stop string,
    become `pad_token_id` (what generate() returns for rows that ended before the others)."""
    if pad_token_id is None:
        return tokens
    B, n = tokens.shape
    idx = torch.arange(n, device=tokens.device)
    ended = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(tokens, dtype=torch.bool)
    after = ended.long().cumsum(1) - ended.long() > 0  # strictly after the first end token
    for b, t in enumerate(stopped_at):
        if t is not None:
            after[b] |= idx > t
    return tokens.masked_fill(after, pad_token_id)
