"""Tiny random-weight models built from configs (tests, CPU smoke runs of the CLI and the benchmark)."""
from .tiny import (  # noqa: F401
    IMAGE_TOKEN, llava_prompt, tiny_llama_lm, tiny_llava, tiny_qwen2_lm,
)
