"""Tiny random-weight models built from configs for tests (the builders live in `mllm_efficiency.tiny`)."""
from .tiny import (  # noqa: F401
    IMAGE_TOKEN, llava_prompt, tiny_llama_lm, tiny_llava, tiny_qwen2_lm,
)
