"""Undo a failed attach: `ModelSnapshot(model)` before, `.restore()` if the attach raised.

Covers everything an attach changes: hooks on every submodule, submodules replaced in place (SIC wrappers),
attributes named `_mllm_eff*` (engines, the shared ModelContext and AttentionHub, whose reference counts and
callback lists are put back too), every config's attention implementation, and the library's registrations
in transformers' attention registry.
"""
from __future__ import annotations

import torch
from torch import nn

from . import attention
from .attachments import PREFIX, own_attributes as _own_attrs
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _shallow_state(obj) -> dict:
    # lists and dicts copied one level: users counters, callback lists and step lists come back as they were
    return {k: (type(v)(v) if type(v) in (list, dict, set) else v) for k, v in vars(obj).items()}


def _plain_object(v) -> bool:
    return hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor, type))


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        cfg = stack.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen.add(id(cfg))
        out.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            stack.append(getattr(cfg, key, None))
    return out


class ModelSnapshot:
    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.hooks = [{d: set(getattr(m, d, {})) for d in _HOOK_DICTS} for m in self.modules]
        self.children = [dict(m._modules) for m in self.modules]
        self.attrs = [_own_attrs(m) for m in self.modules]
        self.objects = {id(v): (v, _shallow_state(v)) for a in self.attrs for v in a.values() if _plain_object(v)}
        self.configs = [(c, c._attn_implementation_internal) for c in _configs(model)]
        self.registry = attention.registry_state()

    def restore(self) -> None:
        for m, hooks, children, attrs in zip(self.modules, self.hooks, self.children, self.attrs):
            for name, before in hooks.items():
                d = getattr(m, name, None)
                for key in [k for k in (d or {}) if k not in before]:
                    del d[key]
            for name, child in children.items():
                if m._modules.get(name) is not child:
                    m._modules[name] = child
            for name in [k for k in vars(m) if k.startswith(PREFIX) and k not in attrs]:
                delattr(m, name)
            m.__dict__.update(attrs)
        for obj, state in self.objects.values():
            obj.__dict__.clear()
            obj.__dict__.update(state)
        for cfg, impl in self.configs:
            cfg._attn_implementation_internal = impl
        attention.restore_registry_state(self.registry)
