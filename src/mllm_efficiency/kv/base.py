"""What every KV-compression method shares: the budget fields of its config, the per-layer input a policy
scores, the selection it returns, its stats, and the handle `apply()` gets.

Budget convention (docs/kv_methods.md): `ratio` is the fraction of the prompt's KV entries removed,
`budget_tokens` the number kept per layer and KV head, `budgets` the seed's kept fraction; at most one of
them. `L_b` is the number of real tokens layer i cached for sample b (padding excluded, after token pruning).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import MethodConfig, check_bool, check_choice, check_int, check_ratio
from ..errors import ConfigError
from . import primitives as P
from ..core.device import device_ints

DEFAULT_RATIO = 0.5


@dataclasses.dataclass(frozen=True)
class KVConfig(MethodConfig):
    """Budget and decoding fields of every KV method (defaults: ratio 0.5, no decode-time eviction)."""

    ratio: float | None = None
    budget_tokens: int | None = None
    budgets: float | None = None
    decode: str = "none"
    decode_budget: int | None = None
    evict_every: int = 1

    decode_modes = ("none",)  # class attribute: what the method supports

    def validate(self) -> None:
        given = [n for n in ("ratio", "budget_tokens", "budgets") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} are mutually exclusive: ratio = fraction of prompt KV "
                              "removed, budget_tokens = tokens kept per layer, budgets = fraction kept")
        if self.ratio is not None:
            check_ratio("ratio", self.ratio)
        if self.budget_tokens is not None:
            check_int("budget_tokens", self.budget_tokens, 1)
        if self.budgets is not None:
            b = self.budgets
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0.0 < float(b) <= 1.0:
                raise ConfigError(f"budgets must be a fraction kept in (0, 1], got {b!r}")
        check_choice("decode", self.decode, self.decode_modes)
        if self.decode_budget is not None:
            check_int("decode_budget", self.decode_budget, 1)
        check_int("evict_every", self.evict_every, 1)
        if self.decode == "none" and (self.decode_budget is not None or self.evict_every != 1):
            modes = [m for m in self.decode_modes if m != "none"]
            hint = f"set decode to one of {modes}" if modes else "this method has no decode-time eviction"
            raise ConfigError(f"decode_budget / evict_every need decode-time eviction: {hint}")

    @property
    def removed(self) -> float | None:
        """Fraction removed (None when an absolute `budget_tokens` is set)."""
        if self.budget_tokens is not None:
            return None
        if self.budgets is not None:
            return 1.0 - float(self.budgets)
        return DEFAULT_RATIO if self.ratio is None else float(self.ratio)

    def keep(self, length: int) -> int:
        return P.prompt_keep_count(length, self.removed, self.budget_tokens)

    def kept_fraction(self, length: int) -> float:
        """(1 - ratio), or budget_tokens / L for absolute budgets (capped at 1)."""
        if self.budget_tokens is not None:
            return min(1.0, self.budget_tokens / max(length, 1))
        return 1.0 - self.removed

    def describe(self) -> str:
        if self.budget_tokens is not None:
            return f"keeping {self.budget_tokens} prompt tokens per layer"
        r = self.removed
        return f"removing {r:.0%} of prompt KV (keeping {1 - r:.0%})"


MERGE_CHOICES = ("none", "pivot", "average")


def check_parity_options(cfg) -> None:
    """`merge` and `head_adaptive` of the scored KV methods (EffiVLM-Bench's options of the same names)."""
    check_choice("merge", cfg.merge, MERGE_CHOICES)
    check_bool("head_adaptive", cfg.head_adaptive)


def check_pooling(pooling: str, kernel: int, group_reduce: str) -> None:
    check_choice("pooling", pooling, ("avg", "max", "none"))
    check_int("kernel_size", kernel, 1)
    check_choice("group_reduce", group_reduce, ("mean", "max"))


@dataclasses.dataclass
class LayerInput:
    """One layer's prefill attention call, as a policy sees it."""

    layer: int
    num_layers: int
    query: torch.Tensor  # (B, H, Lq, D) post-RoPE
    key: torch.Tensor  # (B, Hkv, S, D) what the layer stores
    value: torch.Tensor
    mask: Any  # the backend's attention mask for this call
    scaling: float
    attn_kw: dict  # softcap / sliding_window for attention_rows
    real: torch.Tensor  # (B, S) bool: slot holds a real prompt token (not padding / filler)
    positions: torch.Tensor  # (B, S) original index of each slot
    lengths: list[int]  # L_b
    keep: list[int]  # keep_b
    visual: torch.Tensor | None  # (B, S) bool: slot holds an image/video token (None: unknown)

    def window_mask(self, w: list[int]) -> torch.Tensor:
        return P.last_real(self.real, device_ints(w, self.real.device))


@dataclasses.dataclass
class Selection:
    """What to keep: `keep` counts per sample (B,) or per sample and KV head (B, Hkv), chosen from `score`
    with `protected` slots always kept. Shapes (B, Hc, S), Hc = 1 (same slots in every head) or Hkv."""

    score: torch.Tensor
    candidate: torch.Tensor
    protected: torch.Tensor
    keep: list  # list[int] or list[list[int]]
    decode_score: torch.Tensor | None = None  # (B, Hkv, S) scores kept for decode-time eviction
    merge: Any = None  # callable(layer_input, idx, valid) -> (keys, values) replacing the gathered ones


@dataclasses.dataclass
class KVStats:
    """What the last prefill did, per layer (lists indexed by layer), plus counters."""

    method: str = ""
    prefills: int = 0
    prompt_lengths: list = dataclasses.field(default_factory=list)  # [layer][b] L_b
    kept: list = dataclasses.field(default_factory=list)  # [layer][b] mean kept per KV head (logical)
    kept_per_head: list = dataclasses.field(default_factory=list)  # [layer][b][h]
    stored: list = dataclasses.field(default_factory=list)  # [layer] physical stored length
    bytes_before: int = 0
    bytes_after: int = 0
    scoring_time_s: float = 0.0
    budget_fractions: list | None = None  # VL-Cache: [layer][b] f_l
    decode_evictions: int = 0

    def reset(self) -> None:
        self.prompt_lengths, self.kept, self.kept_per_head, self.stored = [], [], [], []
        self.bytes_before = self.bytes_after = 0
        self.scoring_time_s = 0.0
        self.budget_fractions = None

    @property
    def kept_fraction(self) -> float:
        """Kept prompt KV over all layers and samples (logical; 1.0 before any prefill)."""
        total = sum(sum(x) for x in self.prompt_lengths)
        return sum(sum(x) for x in self.kept) / total if total else 1.0


class Policy:
    """A method's contribution to the KV engine. Subclasses implement `select` (per layer at prefill) or, with
    `layer_wise_post_pass`, `record` + `finish`; decode-time eviction adds `decode_update` / `decode_scores`."""

    needs_visual = False
    layer_wise_post_pass = False  # True: `record` per layer, `finish` selects for every layer (VL-Cache)

    def __init__(self, name: str, config: KVConfig):
        self.name = name
        self.config = config
        self.stats = KVStats(method=name)

    def active(self, lengths: list[int]) -> bool:
        """Whether a prefill with these real prompt lengths changes anything."""
        return self.config.decode != "none" or any(self.config.keep(n) < n for n in lengths)

    def select(self, inp: LayerInput) -> Selection | None:  # pragma: no cover - abstract
        """What layer `inp.layer` keeps (None: leave it untouched)."""
        raise NotImplementedError

    def record(self, inp: LayerInput):
        """Layer-wise post-pass policies: per-layer statistics kept until `finish`."""
        raise NotImplementedError

    def finish(self, records: dict) -> dict:
        """Layer-wise post pass: {layer: (LayerInput, record)} -> {layer: Selection}."""
        return {}

    def check_model(self, adapter) -> None:
        """Refuse a model this policy cannot run on (called before anything is attached)."""

    def setup(self, adapter) -> None:
        """Called once the engine is attached (e.g. to add hooks the policy needs; undone by `teardown`)."""

    def teardown(self) -> None:
        """Undo `setup` (called by `remove()`, possibly more than once)."""

    def decode_update(self, layer, query, key, mask, scaling, attn_kw) -> None:
        """Called for every continuation forward of a layer with a decode budget (e.g. accumulate scores)."""

    def decode_scores(self, layer, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, protected) over the layer's stored slots, shapes broadcastable to (B, Hkv, S)."""
        raise NotImplementedError


def kept_positions(cache, layer: int, batch: int = 0, head: int = 0) -> list[int]:
    """Original positions held by KV head `head` of sample `batch` in layer `layer` of a (compressed) cache,
    ascending; appended tokens included, filler slots excluded."""
    lay = cache.layers[layer]
    B = lay.keys.shape[0]
    pos = lay.slot_positions(batch=B) if hasattr(lay, "slot_positions") else \
        torch.arange(lay.get_seq_length()).expand(B, -1)
    pos = pos.expand(B, *pos.shape[1:])
    valid = lay.slot_valid() if hasattr(lay, "slot_valid") else None
    p = pos[batch, head] if pos.dim() == 3 else pos[batch]
    if valid is not None:
        p = p[valid[batch, head] if valid.dim() == 3 else valid[batch]]
    return p.tolist()
