"""Loading a VLM and building its prompts: shared by the lmms-eval plugin (`eval.plugin`) and `mllm-eff predict`,
without importing lmms-eval."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

VICUNA_TEMPLATE = ("{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an "
                   "artificial intelligence assistant. USER: {{ message['content'] }} {% elif message['role'] == "
                   "'user' %}USER: {{ message['content'] }} {% else %} ASSISTANT: {{ message['content'] }}"
                   "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
CONV_TEMPLATES = ("chatml", "vicuna", "plain")


def parse_dtype(value: Any):
    """A torch dtype from auto / float32 / fp32 / bfloat16 / bf16 / float16 / fp16 / half (None = auto)."""
    if value in (None, "auto"):
        return None
    if isinstance(value, torch.dtype):
        return value
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(str(value), str(value))
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"dtype must be one of auto, float32, bfloat16, float16; got {value!r}")
    return dt


def load_vlm(pretrained: str, dtype=None, attn_implementation: str = "sdpa", device_map: Any = None,
             trust_remote_code: bool = False):
    """(model, processor) for the embedded default alias or a local Hugging Face VLM directory."""
    from .shapes_vlm import ALIAS, load_shapes_vlm

    if pretrained in (ALIAS, "default"):
        model, processor = load_shapes_vlm(dtype=dtype, attn_implementation=attn_implementation, device=None)
        return model, processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = dict(dtype=dtype or "auto", attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
    return model, processor


def chat_prompt(processor, context: str, num_images: int, conv_template: str | None = None) -> str:
    """The prompt text for `num_images` images followed by `context`: the processor's chat template (one user
    turn, generation prompt added) unless `conv_template` names another (chatml / vicuna / plain). Image tokens
    already in `context` are removed; the template places one per image."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_token = getattr(processor, "image_token", "<image>")
    text = context.replace("<image>", "").replace(image_token, "").strip() if num_images else context
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    if conv_template == "plain":
        return (image_token + "\n") * num_images + text
    if conv_template == "vicuna":
        msg = [{"role": "user", "content": (image_token + "\n") * num_images + text}]
        return tokenizer.apply_chat_template(msg, chat_template=VICUNA_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    if conv_template == "chatml" or getattr(processor, "chat_template", None):
        from .local_processor import CHATML_TEMPLATE

        template = None if conv_template is None else CHATML_TEMPLATE.replace("{{ image_token }}", image_token)
        return processor.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    return (image_token + "\n") * num_images + text
