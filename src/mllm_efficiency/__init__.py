"""MLLM-Efficiency: training-free efficiency methods for multimodal and long-context LLMs.

    import mllm_efficiency as me
    h = me.apply(model, "fastv", k=2, ratio=0.75)
    h.stats; h.remove()
    out = me.generate(model, **inputs, max_new_tokens=32)   # greedy decoding on the fast path
"""
from .api import apply
from .errors import ConfigError, NoVisualTokensError, UnsupportedMethodError, UnsupportedModelError
from .registry import available_methods, get_method
from .core.cache import TrackedCache

__version__ = "0.1.0"


def __getattr__(name):
    # heavy imports (transformers model classes) only when asked for
    if name == "LlavaForConditionalGeneration":
        from .models import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    if name == "generate":
        from .fast.generate import generate

        return generate
    if name in ("FastVConfig",):
        from .pruning.fastv import FastVConfig

        return FastVConfig
    raise AttributeError(name)


__all__ = ["apply", "available_methods", "get_method", "ConfigError", "NoVisualTokensError",
           "UnsupportedModelError", "UnsupportedMethodError", "TrackedCache", "LlavaForConditionalGeneration", "FastVConfig", "generate"]
