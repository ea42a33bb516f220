"""Rotations at chosen positions with the model's own rotary embedding (docs/long_context_memory.md).

Block memory never rotates at absolute positions: local keys sit at 0..n-1, global queries at one fixed
position. The cos/sin come from the model's `rotary_emb` (its `inv_freq` and attention scaling, so Llama-3.1
`llama3` and YaRN scaling carry over); a YAML `base` / `distance_scale` rebuilds plain RoPE instead, as the
reference did.
"""
from __future__ import annotations

import warnings

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeTable:
    """fp32 cos/sin for positions 0..max_pos-1, cached per (device, dtype) on first use."""

    def __init__(self, rotary_emb, head_dim: int, max_pos: int, base: float | None = None,
                 distance_scale: float | None = None):
        self.head_dim = head_dim
        self.max_pos = max_pos
        pos = torch.arange(max_pos, dtype=torch.float32)
        if base is not None or distance_scale is not None:
            rope_type = getattr(rotary_emb, "rope_type", "default")
            if rope_type not in ("default", None):
                warnings.warn(f"memory: base/distance_scale rebuild plain RoPE; the model's own {rope_type!r} "
                              "scaling is not used", UserWarning, stacklevel=3)
            if base is None:
                inv_freq = rotary_emb.inv_freq.float().cpu()
                scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
            else:
                inv_freq = 1.0 / (float(base) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
                scaling = 1.0
            freqs = (pos * float(distance_scale or 1.0))[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos() * scaling, emb.sin() * scaling
        else:
            probe = torch.zeros(1, dtype=torch.float32, device=rotary_emb.inv_freq.device)
            cos, sin = rotary_emb(probe, pos.to(probe.device)[None].long())
            self._cos, self._sin = cos[0].float().cpu(), sin[0].float().cpu()
        self._cache: dict = {}

    def tables(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (self._cos.to(device=device, dtype=dtype), self._sin.to(device=device, dtype=dtype))
        return self._cache[key]

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x (..., n, D) rotated at positions start..start+n-1."""
        n = x.shape[-2]
        if start < 0 or start + n > self.max_pos:
            raise ValueError(f"rotation positions {start}..{start + n - 1} outside the table (max {self.max_pos})")
        cos, sin = self.tables(x.device, x.dtype)
        return x * cos[start:start + n] + rotate_half(x) * sin[start:start + n]

    def rotate_at(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """x (..., n, D) with every row rotated at the same `position`."""
        cos, sin = self.tables(x.device, x.dtype)
        return x * cos[position] + rotate_half(x) * sin[position]
