"""Theoretical FLOPs of a prefill whose decoder layers see different sequence lengths, and of one decode step.

Builds on :func:`mllm_efficiency.flops.exact_layer_flops` (2 x MACs: q/k/v/o projections with GQA widths, causal
attention n^2/2, gated MLP). Token pruning makes later layers shorter; KV compression leaves the prefill alone and
shortens what a decode step reads. Norms, RoPE, softmax, embeddings and the vision tower are not counted.
"""
from __future__ import annotations

import numbers
from typing import Sequence

from ..errors import ConfigError
from ..flops import LayerShape, exact_layer_flops

__all__ = ["prefill_flops", "decode_step_flops", "lm_head_flops"]


def lm_head_flops(shape: LayerShape) -> float:
    return 2.0 * shape.hidden * shape.vocab


def _lengths(name: str, shape: LayerShape, lengths: Sequence[int]) -> list[int]:
    lengths = list(lengths)
    if len(lengths) != shape.num_layers:
        raise ConfigError(f"{name} must list one length per decoder layer ({shape.num_layers}), got {len(lengths)}")
    for i, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ConfigError(f"{name}[{i}] must be an integer >= 0, got {n!r}")
    return [int(n) for n in lengths]


def _batch(batch: int) -> int:
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch!r}")
    return int(batch)


def prefill_flops(shape: LayerShape, layer_lengths: Sequence[int], batch: int = 1, lm_head_tokens: int = 1) -> float:
    """FLOPs of one prefill where decoder layer i processes `layer_lengths[i]` tokens (per row), for `batch` rows,
    plus the LM head on `lm_head_tokens` positions per row. All lengths equal = the unmodified model."""
    lengths = _lengths("layer_lengths", shape, layer_lengths)
    if isinstance(lm_head_tokens, bool) or not isinstance(lm_head_tokens, numbers.Integral) or lm_head_tokens < 0:
        raise ConfigError(f"lm_head_tokens must be an integer >= 0, got {lm_head_tokens!r}")
    per_row = sum(exact_layer_flops(shape, n) for n in lengths) + lm_head_tokens * lm_head_flops(shape)
    return _batch(batch) * per_row


def decode_step_flops(shape: LayerShape, kv_lengths: Sequence[int], batch: int = 1) -> float:
    """FLOPs of one decode step (one new token per row) attending to `kv_lengths[i]` stored tokens in layer i
    (the new token included), plus the LM head."""
    lengths = _lengths("kv_lengths", shape, kv_lengths)
    q_width = shape.num_heads * shape.head_dim
    one_token = exact_layer_flops(shape, 1) - 2 * (2.0 * q_width / 2.0)  # projections + MLP, no attention
    per_row = sum(one_token + 2 * (2.0 * q_width * n) for n in lengths) + lm_head_flops(shape)
    return _batch(batch) * per_row
