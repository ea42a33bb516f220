"""What the fast path can run, and the stats objects a captured prefill must restore after each replay.

The attached methods are found through `core.attachments` (no attribute-name strings here)."""
from __future__ import annotations

from ..core.attachments import kv_engine, memory_engine, pruning_engine


def unsupported_reason(model, adapter, lm_head) -> str | None:
    """Why greedy decoding on this model, with its attached methods, cannot take the fast path (None: it can).
    These cases fall back to `model.generate`."""
    if lm_head is None:
        return f"{type(model).__name__} has no LM head"
    if adapter.sliding_window_layers():
        return f"sliding-window layers {adapter.sliding_window_layers()} (the slot decoder attends every slot)"
    if getattr(adapter.text_config, "final_logit_softcapping", None):
        return "final logit soft-capping (applied outside the LM head)"
    if memory_engine(adapter) is not None:
        return "a long-context memory method (it runs its own chunked prefill and block retrieval)"
    for step in getattr(pruning_engine(adapter), "steps", ()):
        name = getattr(step, "method_name", type(step).__name__)
        if not getattr(step, "fast_decode", True):
            why = getattr(step, "fast_decode_reason", None) or "its decode steps need the model's own loop"
            return f"{name} ({why})"
        if getattr(step, "mode", None) == "inplace" and getattr(step, "positions", None) == "renumber" \
                and (getattr(step, "layer", None) or 0) > 0:
            return (f"{name} (positions='renumber' from layer {step.layer} on: the layers before it keep the "
                    "original positions, and the slot decoder decodes every layer at one position)")
    kv = kv_engine(adapter)
    policy = getattr(kv, "policy", None)
    if policy is not None and policy.config.decode != "none":
        return f"{policy.name} with decode={policy.config.decode!r} evicts during decoding"
    return None


def capture_blocker(adapter) -> str | None:
    """Why the prefill of this model's methods must run eagerly (None: it may be captured as a graph): token
    pruning steps that decide on the host from the hidden states (which the graph cache's key does not
    determine) declare `graph_capture = False` or do not declare it."""
    engine = pruning_engine(adapter)
    for step in getattr(engine, "steps", ()):
        if not getattr(step, "graph_capture", False):
            name = getattr(step, "method_name", type(step).__name__)
            return f"{name} decides on the host during the prefill"
    return None


def method_stats(adapter) -> list:
    """The stats objects of the attached pruning steps and KV policy."""
    out = []
    engine = pruning_engine(adapter)
    for step in getattr(engine, "steps", ()):
        stats = getattr(step, "stats", None)
        if stats is not None and stats not in out:
            out.append(stats)
    kv = kv_engine(adapter)
    policy = getattr(kv, "policy", None)
    if policy is not None and getattr(policy, "stats", None) is not None:
        out.append(policy.stats)
    return out
