"""One attention wrapper per text model, registered through transformers' AttentionInterface.

The wrapper forwards every call unchanged to the implementation the model was configured with
(sdpa, flash_attention_2, eager, ...), so outputs are identical; afterwards it hands the post-RoPE
query and the keys attention saw to the callbacks methods registered (e.g. FastV's scoring row).
Only the language model's config is switched; a vision tower keeps its own implementation.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attachments import HUB as _HUB_ATTR

PREFIX = "mllm_eff_"
_registered: set[str] = set()
_users: dict[str, int] = {}  # registered name -> models using it; the last user's release unregisters it

AttentionCallback = Callable[..., None]  # cb(module, query, key, value, attention_mask, kwargs)


def wrapper_name(inner: str) -> str:
    return PREFIX + inner


def inner_name(impl: str | None) -> str:
    impl = impl or "sdpa"
    return impl[len(PREFIX):] if impl.startswith(PREFIX) else impl


def _resolve_inner(inner: str, module: torch.nn.Module) -> Callable:
    if inner == "eager":
        # each model file defines its own eager function and passes it as the default
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def register_attention(name: str, fn: Callable, mask_fn: Callable | None = None) -> None:
    """Register `name` in transformers' attention registry (and its mask function) for one more user."""
    if name not in _registered:
        AttentionInterface.register(name, fn)
        if mask_fn is not None:
            AttentionMaskInterface.register(name, mask_fn)
        _registered.add(name)
    _users[name] = _users.get(name, 0) + 1


def release_attention(name: str) -> None:
    """One user fewer; the last one takes `name` out of the global registries."""
    _users[name] = _users.get(name, 1) - 1
    if _users[name] > 0:
        return
    del _users[name]
    _registered.discard(name)
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def registry_state():
    """What `restore_registry_state` needs to undo registrations made since."""
    return set(_registered), dict(_users)


def restore_registry_state(state) -> None:
    registered, users = state
    for name in _registered - registered:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
    _registered.intersection_update(registered)
    _users.clear()
    _users.update(users)


def _ensure_registered(inner: str) -> str:
    name = wrapper_name(inner)
    if name in _registered:
        _users[name] += 1
        return name
    if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        raise ValueError(f"attn_implementation {inner!r} cannot be wrapped; registered: "
                         f"{sorted(ALL_ATTENTION_FUNCTIONS.valid_keys())}")

    fixed = None if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]

    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = fixed if fixed is not None else _resolve_inner(inner, module)
        hub = getattr(module, _HUB_ATTR, None)
        if hub is not None and hub.query_transforms:  # e.g. Focus's similarity concentration of Q
            for transform in hub.query_transforms:
                query = transform(module, query, kwargs)
        output = fn(module, query, key, value, attention_mask, **kwargs)
        if hub is not None and hub.callbacks:
            for callback in hub.callbacks:
                callback(module, query, key, value, attention_mask, kwargs)
        return output

    register_attention(name, attention, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(inner, sdpa_mask))
    return name


class AttentionHub:
    """Owned jointly by the methods attached to one text model (reference counted)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.callbacks: list[AttentionCallback] = []
        self.query_transforms: list[Callable] = []  # fn(module, query, kwargs) -> query, before attention
        self.users = 0
        self.original_impl = adapter.text_config._attn_implementation
        self.inner = inner_name(self.original_impl)

    @classmethod
    def acquire(cls, adapter) -> "AttentionHub":
        modules = adapter.attention_modules()
        hub = getattr(modules[0], _HUB_ATTR, None)
        if hub is None:
            hub = cls(adapter)
            name = _ensure_registered(hub.inner)
            for m in modules:
                setattr(m, _HUB_ATTR, hub)
            adapter.text_config._attn_implementation = name
        hub.users += 1
        return hub

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        for m in self.adapter.attention_modules():
            if getattr(m, _HUB_ATTR, None) is self:
                delattr(m, _HUB_ATTR)
        self.adapter.text_config._attn_implementation = self.original_impl
        release_attention(wrapper_name(self.inner))

    def add_callback(self, cb: AttentionCallback) -> None:
        self.callbacks.append(cb)

    def remove_callback(self, cb: AttentionCallback) -> None:
        self.callbacks = [c for c in self.callbacks if c is not cb]

    def add_query_transform(self, fn: Callable) -> None:
        """`fn(module, query, kwargs) -> query`, applied to Q after RoPE before attention runs."""
        self.query_transforms.append(fn)

    def remove_query_transform(self, fn: Callable) -> None:
        self.query_transforms = [f for f in self.query_transforms if f is not fn]
