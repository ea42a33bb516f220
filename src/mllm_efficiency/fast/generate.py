"""`mllm_efficiency.generate`: `model.generate` for greedy decoding, on the fast path.

    out = me.generate(model, **inputs, max_new_tokens=32)          # token ids, like model.generate
    with me.apply(model, "fastv", k=2, ratio=0.75) as h:
        out = h.generate(**inputs, max_new_tokens=32)               # the same through the handle

Greedy decoding (the generation config's defaults: no sampling, one beam, no logits processors) runs on
`FastSession`: a graph-captured prefill and one CUDA-graph replay per new token on CUDA, the same code eagerly
on CPU. End-of-sequence ids (the generation config's, or `eos_token_id=`), `stop_strings=` (with
`tokenizer=`), left-padded batches and `return_dict_in_generate=True` are handled as `model.generate` does.
Anything else (sampling, beams, logits processors, per-step scores, methods that evict during decoding,
long-context memory) runs `model.generate` itself, after a one-line notice; `fast=False` always does.
"""
from __future__ import annotations

import copy
import logging

import torch

from ..errors import ConfigError
from .session import session_for

log = logging.getLogger("mllm_efficiency.fast")

# generation-config fields whose non-default values change which token greedy decoding picks, or ask for
# outputs the fast path does not produce: (name, values that leave greedy decoding unchanged)
_GREEDY_ONLY = (
    ("do_sample", (False, None)), ("num_beams", (1, None)), ("num_beam_groups", (1, None)),
    ("num_return_sequences", (1, None)), ("penalty_alpha", (None,)), ("repetition_penalty", (1.0, None)),
    ("encoder_repetition_penalty", (1.0, None)), ("no_repeat_ngram_size", (0, None)),
    ("encoder_no_repeat_ngram_size", (0, None)), ("bad_words_ids", (None,)), ("force_words_ids", (None,)),
    ("min_length", (0, None)), ("min_new_tokens", (0, None)), ("forced_bos_token_id", (None,)),
    ("forced_eos_token_id", (None,)), ("suppress_tokens", (None,)), ("begin_suppress_tokens", (None,)),
    ("sequence_bias", (None,)), ("guidance_scale", (None, 1.0)), ("exponential_decay_length_penalty", (None,)),
    ("renormalize_logits", (False, None)), ("output_scores", (False, None)), ("output_logits", (False, None)),
    ("output_attentions", (False, None)), ("output_hidden_states", (False, None)),
    ("prompt_lookup_num_tokens", (None,)), ("watermarking_config", (None,)), ("assistant_early_exit", (None,)),
    ("constraints", (None,)), ("low_memory", (None, False)), ("dola_layers", (None,)),
    ("epsilon_cutoff", (0.0, None)), ("eta_cutoff", (0.0, None)), ("max_time", (None,)),
)
_FALLBACK_ONLY = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                  "negative_prompt_ids", "negative_prompt_attention_mask", "synced_gpus", "past_key_values",
                  "cache", "custom_generate")
FAST_CHOICES = ("auto", True, False)


def generate(model, *, max_new_tokens: int | None = None, fast="auto", tokenizer=None, streamer=None,
             **kwargs):
    """Greedy generation on the fast path where it applies, else `model.generate(**kwargs)` (see module doc).

    `fast`: "auto" (fast path when it applies, else `model.generate` with a notice), True (the same, but a
    case the fast path cannot run raises `ConfigError` instead of falling back), False (`model.generate`).
    Returns what `model.generate` returns: the prompt followed by the new tokens, or a generate output object
    with `return_dict_in_generate=True`."""
    if fast not in FAST_CHOICES and fast not in ("true", "false"):
        raise ConfigError(f"fast must be one of 'auto', True, False; got {fast!r}")
    fast = {"true": True, "false": False}.get(fast, fast)
    config = copy.deepcopy(model.generation_config)
    model_inputs = config.update(**kwargs)  # the keys that are not generation options are the model's inputs
    if max_new_tokens is None:
        max_new_tokens = config.max_new_tokens
    reason = None if fast is not False else "fast=False"
    if reason is None:
        reason = _reason_not_fast(model, config, model_inputs, max_new_tokens, tokenizer)
    if reason is not None:
        if fast is True:
            raise ConfigError(f"fast=True, but the fast path cannot run this call: {reason}")
        if fast == "auto":
            _notice(f"mllm_efficiency.generate: {reason}; running model.generate instead")
        extra = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        return model.generate(tokenizer=tokenizer, streamer=streamer, **extra, **kwargs) if tokenizer is not None \
            else model.generate(streamer=streamer, **extra, **kwargs)
    session = session_for(model)
    eos = config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    stop = _stop_checker(config.stop_strings, tokenizer)
    ids = model_inputs["input_ids"]
    new = session.generate(model_inputs, max_new_tokens, eos_token_ids=eos, pad_token_id=pad, stop=stop,
                           streamer=streamer)
    sequences = torch.cat([ids, new.to(ids.dtype)], dim=1)
    if config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _reason_not_fast(model, config, model_inputs: dict, max_new_tokens, tokenizer) -> str | None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        return f"max_new_tokens={max_new_tokens!r} (the fast path needs an integer >= 1)"
    for name, defaults in _GREEDY_ONLY:
        value = getattr(config, name, None)
        if value not in defaults:
            return f"{name}={value!r} is not plain greedy decoding"
    for name in _FALLBACK_ONLY:
        if model_inputs.get(name) is not None:
            return f"{name} is not supported on the fast path"
    if config.stop_strings and tokenizer is None:
        return "stop_strings need tokenizer="
    ids = model_inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "the fast path needs 2-D input_ids"
    if model_inputs.get("inputs_embeds") is not None:
        return "inputs_embeds (the fast path starts from input_ids)"
    if config.use_cache is False:
        return "use_cache=False"
    mask = model_inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and ids.shape[1] > 1 and bool((mask[:, -1] == 0).any()):
        return "right padding (pad on the left)"
    return session_for(model).unsupported_reason()


def _stop_checker(stop_strings, tokenizer):
    if not stop_strings:
        return None
    strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)

    def stop(row: int, tokens: torch.Tensor) -> bool:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        return any(s in text for s in strings)

    return stop


_SAID: set[str] = set()


def _notice(text: str) -> None:
    if text not in _SAID:
        _SAID.add(text)
        log.warning(text)
