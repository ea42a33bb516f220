"""Long-context block memory (docs/long_context_memory.md): Q-LLM, InfLLM, StreamingLLM (memory variant), LM-Infinite.

    import mllm_efficiency as me
    from mllm_efficiency.memory import GreedySearch, load_memory_config, patch_hf
    h = me.apply(model, "qllm", n_local=1024, topk=8, question_weight=4)
    answers = GreedySearch(model, tokenizer).generate(text=prompt, question="What is the pass key?")

Importing this package registers the methods `qllm`, `infllm`, `streamingllm_memory`, `lm_infinite`.
"""
from . import infllm, lm_infinite, qllm, streaming  # noqa: F401  (registration)
from .config import InfLLMConfig, LMInfiniteConfig, MemoryConfig, QLLMConfig, StreamingMemoryConfig
from .engine import MemoryEngine

__all__ = ["MemoryConfig", "QLLMConfig", "InfLLMConfig", "StreamingMemoryConfig", "LMInfiniteConfig",
           "MemoryEngine", "GreedySearch", "patch_hf", "load_memory_config", "METHOD_OF_TYPE"]


def __getattr__(name):
    if name in ("GreedySearch", "patch_hf", "METHOD_OF_TYPE", "locate_question"):
        from . import search

        return getattr(search, name)
    if name in ("load_memory_config", "MemoryYAML"):
        from . import yaml_config

        return getattr(yaml_config, name)
    raise AttributeError(name)
