"""Expected Attention (kvpress `ExpectedAttentionPress`, Devoto et al., 2025): score each key by the attention
that future queries are expected to pay it, under a Gaussian model of those queries.

Per layer and query head h: μ_h, Σ_h = mean and covariance of the layer's pre-RoPE prompt queries, the first
`n_sink` tokens left out (kvpress's query statistics; read from the layer's `q_proj` output, so the q_proj bias
is included where the model has one, whereas kvpress projects the mean hidden state with the weight alone).
RoPE of the next `n_future_positions` positions (from the prompt length on) is averaged into one matrix R̄,
μ ← R̄μ, Σ ← R̄ΣR̄ᵀ (kvpress's "average rotation"). A (post-RoPE) key k_j then gets
    z_hj = μ_h·k_j / √d + k_jᵀ Σ_h k_j / (2d),   a_hj = softmax_j(z_hj) over the non-sink prompt keys,
the expected attention exp(E[q]·k/√d + Var/2) normalised; its mean over the query heads of a KV head, rescaled
by the value norm, (a + ε)·‖v_j‖, is the score. The first `n_sink` tokens are always kept; keep the top
`keep` per KV head. Defaults as kvpress: n_future_positions 512, n_sink 4, use_covariance, use_vnorm,
epsilon 0. The full per-head d×d covariance is what kvpress uses too (no diagonal approximation).
Models whose attention normalises queries (`q_norm`, Qwen3 / Gemma 3) are refused, as kvpress does.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import check_bool, check_int, check_number
from ..core.device import device_ints
from ..core.context import ModelContext
from . import primitives as P
from .base import KVConfig, LayerInput, Policy, Selection
from .method import kv_method


@dataclasses.dataclass(frozen=True)
class ExpectedAttentionConfig(KVConfig):
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_int("n_future_positions", self.n_future_positions, 1)
        check_int("n_sink", self.n_sink, 0)
        check_bool("use_covariance", self.use_covariance)
        check_bool("use_vnorm", self.use_vnorm)
        check_number("epsilon", self.epsilon, 0.0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x R̄ᵀ along the last dim, R̄ = the averaged RoPE map x -> x cos + rotate_half(x) sin."""
    return x * cos + _rotate_half(x) * sin


def query_statistics(q: torch.Tensor, rows: torch.Tensor, covariance: bool):
    """q (B, H, L, D) pre-RoPE, rows (B, L) bool: mean (B, H, D) and covariance (B, H, D, D) (1/N) or None."""
    w = rows.float()[:, None, :, None]
    n = w.sum(2).clamp_min(1)  # (B, 1, 1)
    mu = (q * w).sum(2) / n
    if not covariance:
        return mu, None
    c = (q - mu[:, :, None]) * w.sqrt()
    return mu, c.transpose(-1, -2) @ c / n[..., None]


def expected_scores(key, value, mu, cov, candidate, use_vnorm: bool, epsilon: float) -> torch.Tensor:
    """(B, Hkv, S) expected-attention scores; mu (B, H, D) and cov (B, H, D, D) already rotated."""
    B, Hkv, S, D = key.shape
    G = mu.shape[1] // Hkv
    k = key.float().repeat_interleave(G, dim=1)  # (B, H, S, D), repeat_kv's head order
    z = (k @ mu[..., None]).squeeze(-1) / math.sqrt(D)
    if cov is not None:
        z = z + ((k @ cov) * k).sum(-1) / (2 * D)
    z = z.masked_fill(~candidate[:, None], float("-inf"))
    a = torch.nan_to_num(torch.softmax(z, dim=-1), nan=0.0).view(B, Hkv, G, S).mean(2)
    if use_vnorm:
        a = (a + epsilon) * value.float().norm(dim=-1)
    return a


@kv_method("expected_attention", config=ExpectedAttentionConfig,
           summary="Expected Attention (kvpress): keys' expected attention from future queries modelled as a "
                   "Gaussian (RoPE averaged over the next positions), times the value norm")
class ExpectedAttentionPolicy(Policy):
    def __init__(self, name, config):
        super().__init__(name, config)
        self._queries: dict[int, torch.Tensor] = {}
        self._hooks: list = []
        self._rotary = None
        self._mrope = False

    def check_model(self, adapter) -> None:
        for i, attn in enumerate(adapter.attention_modules()):
            if not hasattr(attn, "q_proj"):
                raise NotImplementedError(f"{self.name}: layer {i}'s attention has no q_proj "
                                          "(the query statistics are read from it)")
            if getattr(attn, "q_norm", None) is not None:
                raise NotImplementedError(f"{self.name}: models that normalise queries (q_norm, e.g. Qwen3, "
                                          "Gemma 3) are not supported, as in kvpress")
        if getattr(adapter.text_model, "rotary_emb", None) is None:
            raise NotImplementedError(f"{self.name}: the text model has no rotary_emb (RoPE is required)")

    def setup(self, adapter) -> None:
        self._rotary = adapter.text_model.rotary_emb
        self._mrope = bool(getattr(adapter, "uses_mrope", False))
        context = ModelContext.of(adapter)
        self._host = context.host_values if context is not None else None  # layout reads, replayable in a capture
        for i, attn in enumerate(adapter.attention_modules()):
            idx = getattr(attn, "layer_idx", i)
            self._hooks.append(attn.q_proj.register_forward_hook(self._keep_queries(idx)))

    def teardown(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._queries = [], {}

    def _keep_queries(self, idx: int):
        def hook(module, args, output):
            self._queries[idx] = output
        return hook

    def _future_rotation(self, start: list[int], like: torch.Tensor):
        """Mean cos / sin (B, 1, D) over positions start_b .. start_b + n - 1."""
        n = self.config.n_future_positions
        pos = device_ints(start, like.device)[:, None] + torch.arange(n, device=like.device)  # (B, n)
        if self._mrope:  # future text tokens: the three M-RoPE components are equal
            pos = pos[None].expand(3, -1, -1)
        cos, sin = self._rotary(like, pos)
        while cos.dim() > 3:
            cos, sin = cos[0], sin[0]
        return cos.float().mean(1, keepdim=True), sin.float().mean(1, keepdim=True)

    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        B, H, Lq, D = inp.query.shape
        S = inp.key.shape[2]
        q = self._queries.pop(inp.layer, None)
        if q is None or q.shape[1] != S or Lq != S:
            raise RuntimeError(f"{self.name}: no pre-RoPE queries of layer {inp.layer} matching its {S} prompt keys")
        q = q.float().reshape(B, S, H, D).transpose(1, 2)
        sink = P.first_real(inp.real, device_ints([min(cfg.n_sink, k) for k in inp.keep], inp.real.device))
        stats_rows = inp.real & ~P.first_real(inp.real, device_ints([cfg.n_sink] * B, inp.real.device))
        mu, cov = query_statistics(q, stats_rows, cfg.use_covariance)
        # RoPE positions continue from the prompt's length (original length when tokens were pruned earlier)
        pos = inp.positions.masked_fill(~inp.real, -1)
        first = inp.positions.masked_fill(~inp.real, 1 << 40).amin(1)
        start = (pos.amax(1) - first + 1).clamp_min(0)
        starts = self._host.read("expected_attention_start", start.tolist) if self._host else start.tolist()
        cos, sin = self._future_rotation(starts, q)
        mu = _rotate(mu, cos, sin)
        if cov is not None:
            c4, s4 = cos[:, None], sin[:, None]
            cov = _rotate(_rotate(cov, c4, s4).transpose(-1, -2), c4, s4).transpose(-1, -2)
        candidate = inp.real & ~sink
        score = expected_scores(inp.key, inp.value, mu, cov, candidate, cfg.use_vnorm, cfg.epsilon)
        return Selection(score, candidate[:, None], sink[:, None], inp.keep)
