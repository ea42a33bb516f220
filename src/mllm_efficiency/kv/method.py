"""How a KV method is declared: a config dataclass (a `KVConfig`) plus a `Policy` with `select`, registered by
one decorator. The decorator supplies what the registry calls (`attach(model, adapter, config)`), so a method
file holds no attach wrapper:

    @kv_method("mykv", config=MyKVConfig, summary="...")
    class MyKVPolicy(Policy):
        def select(self, inp: LayerInput) -> Selection: ...
"""
from __future__ import annotations

from ..registry import register_method
from .base import KVConfig, KVStats, Policy
from .engine import KVEngine


class AttachedKV:
    """The object behind the handle: a policy on the model's KV engine."""

    def __init__(self, model, adapter, policy: Policy):
        policy.check_model(adapter)
        if adapter.sliding_window_layers():
            raise NotImplementedError(f"{policy.name}: models with sliding-window layers are not supported")
        self.policy = policy
        self.engine = KVEngine.attach(model, adapter, policy)
        try:
            policy.setup(adapter)
        except BaseException:
            self.remove()
            raise

    @property
    def stats(self) -> KVStats:
        return self.policy.stats

    def remove(self) -> None:
        self.policy.teardown()
        self.engine.detach(self.policy)


def kv_method(name: str, *, config: type, summary: str):
    """Class decorator: register the `Policy` subclass as KV method `name`, configured by `config` (a
    `KVConfig` dataclass); `apply(model, name, **kwargs)` then attaches `cls(name, config(**kwargs))`."""
    if not (isinstance(config, type) and issubclass(config, KVConfig)):
        raise TypeError(f"kv_method {name!r}: config must be a KVConfig dataclass, got {config!r}")

    def decorator(policy_cls: type) -> type:
        if not (isinstance(policy_cls, type) and issubclass(policy_cls, Policy)):
            raise TypeError(f"kv_method {name!r} decorates a Policy subclass, got {policy_cls!r}")

        def attach(model, adapter, cfg) -> AttachedKV:
            return AttachedKV(model, adapter, policy_cls(name, cfg))

        attach.__qualname__ = attach.__name__ = f"attach_{name}"
        register_method(name, family="kv", config_cls=config, summary=summary)(attach)
        return policy_cls

    return decorator
