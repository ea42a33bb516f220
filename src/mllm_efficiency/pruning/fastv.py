"""FastV (arXiv 2403.06764): after layer K-1, drop the fraction R of visual tokens that receive the least
attention from the last query row of layer K-1. Spec: docs/token_pruning.md.

Keep count: keep(N, R) = clamp(round(N * (1 - R)), 1, N) per sample (Python round, ties to even, as in the
llava-hf FastV path), or per image/video span with grouping="per_span". Text tokens are never dropped.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from ..config import MethodConfig, check_choice, check_int, check_ratio
from ..errors import ConfigError, NoVisualTokensError
from ..registry import register_method
from ..adapters.base import token_spans  # re-exported: benchmarks import it from here
from ..flops import visual_keep_count
from .engine import AttachedStep, PruningStats, PruningStep, Request, StepResult
from ..core.attention_rows import key_scores
from ..core.device import device_ints


@dataclasses.dataclass(frozen=True)
class FastVConfig(MethodConfig):
    k: int = 2
    ratio: float = 0.5
    mode: str = "inplace"
    scorer: str = "last_row"
    head_reduce: str = "mean"
    row_reduce: str = "mean"
    grouping: str = "global"
    rerank: str = "static"
    positions: str = "original"
    seed: int = 0
    image_token_start_index: int | None = None
    image_token_length: int | None = None
    allow_text_only: bool = False

    def validate(self) -> None:
        check_int("k", self.k, 0)
        check_ratio("ratio", self.ratio)
        check_choice("mode", self.mode, ("inplace", "mask"))
        check_choice("scorer", self.scorer, ("last_row", "all_rows", "text_rows", "random"))
        check_choice("head_reduce", self.head_reduce, ("mean", "max"))
        check_choice("row_reduce", self.row_reduce, ("mean", "max"))
        check_choice("grouping", self.grouping, ("global", "per_span"))
        check_choice("rerank", self.rerank, ("static",))
        check_choice("positions", self.positions, ("original", "renumber"))
        check_int("seed", self.seed)
        if self.k == 0 and self.scorer != "random":
            raise ConfigError("k=0 needs scorer='random': no attention exists before layer 0")
        if self.positions == "renumber" and self.mode != "inplace":
            raise ConfigError("positions='renumber' applies to mode='inplace' only")
        if (self.image_token_start_index is None) != (self.image_token_length is None):
            raise ConfigError("image_token_start_index and image_token_length must be given together")
        if self.image_token_start_index is not None:
            check_int("image_token_start_index", self.image_token_start_index, 0)
            check_int("image_token_length", self.image_token_length, 1)

    @classmethod
    def from_seed_dict(cls, d: dict[str, Any]) -> "FastVConfig | None":
        """Translate the seeds' `fastv_config` dicts (llava-hf and original FastV keys). None if FastV is off."""
        d = dict(d)
        use = d.pop("use_fastv", d.pop("use_fast_v", True))
        if not use:
            return None
        out: dict[str, Any] = {}
        names = {"fastv_k": "k", "fast_v_agg_layer": "k", "fastv_r": "ratio",
                 "image_token_start_index": "image_token_start_index", "fast_v_sys_length": "image_token_start_index",
                 "image_token_length": "image_token_length", "fast_v_image_token_length": "image_token_length"}
        for key, name in names.items():
            if key in d:
                out[name] = d.pop(key)
        if "fast_v_inplace" in d:
            out["mode"] = "inplace" if d.pop("fast_v_inplace") else "mask"
        if "fast_v_attention_rank" in d:
            rank = d.pop("fast_v_attention_rank")
            n = out.get("image_token_length")
            if not n:
                raise ConfigError("fast_v_attention_rank (number of image tokens kept) needs "
                                  "fast_v_image_token_length to convert into ratio")
            out["ratio"] = 1.0 - rank / n
        out.update(d)  # remaining keys are our own names
        return cls.from_kwargs("fastv", **out)


@dataclasses.dataclass
class FastVStats(PruningStats):
    """What the last prefill did (per sample), plus counters."""

    scoring_layer: int | None = None
    sequence_length: int = 0
    pruned_length: list[int] = dataclasses.field(default_factory=list)  # real (unpadded) tokens after pruning


class FastVStep(PruningStep):
    """One pruning step on the engine."""

    def __init__(self, config: FastVConfig):
        self.config = config
        self.mode = config.mode
        self.positions = config.positions
        self.layer = config.k
        self.score_layer = config.k - 1 if config.scorer != "random" else None
        self.stats = FastVStats(scoring_layer=self.score_layer)
        self._keep: list[int] = []
        # the kept set is chosen on the device from counts the graph key fixes; the seeded random scorer draws on
        # the host and per-span grouping walks the spans on the host
        self.graph_capture = config.scorer != "random" and config.grouping == "global"
        self.method_name = "fastv"

    def visual_positions(self, detected: torch.Tensor | None, B: int, L: int, device) -> torch.Tensor:
        cfg = self.config
        if cfg.image_token_start_index is None:
            if detected is None and cfg.allow_text_only:
                return torch.zeros(B, L, dtype=torch.bool, device=device)
            if detected is None:
                raise NoVisualTokensError(
                    "no image or video tokens found: the model config names no image token id and no "
                    "image_token_start_index / image_token_length were given")
            return detected
        start, n = cfg.image_token_start_index, cfg.image_token_length
        if start + n > L:
            raise ConfigError(f"image_token_start_index + image_token_length = {start + n} exceeds the "
                              f"prompt length {L}")
        span = torch.zeros(B, L, dtype=torch.bool, device=device)
        span[:, start:start + n] = True
        if detected is not None and not torch.equal(detected, span):
            found = [token_spans(row) for row in detected]
            raise ConfigError(f"image_token_start_index={start}, image_token_length={n} disagree with the "
                              f"image tokens found in input_ids: (start, length) per sample = {found}")
        return span

    def plan(self, visual: torch.Tensor, counts: list[int], real_lengths: list[int]) -> bool:
        """Called at each fresh prefill; returns whether this step drops anything. Stats describe a no-op
        (everything kept) until `select` runs."""
        if sum(counts) == 0 and not self.config.allow_text_only:
            raise NoVisualTokensError("no image or video tokens found in the prompt (pass allow_text_only=True "
                                      "to run such prompts unchanged)")
        if self.config.grouping == "per_span":
            keep = [sum(visual_keep_count(n, self.config.ratio) for _, n in token_spans(row)) for row in visual]
        else:
            keep = [visual_keep_count(n, self.config.ratio) for n in counts]
        self._keep = keep
        st = self.stats
        st.num_visual, st.keep_count, st.sequence_length = counts, keep, visual.shape[1]
        st.kept_visual_mask, st.pruned_length, st.cache_lengths = visual, list(real_lengths), None
        return any(k < n for k, n in zip(keep, counts))

    def score(self, req: Request, module, query, key, attention_mask, kwargs) -> torch.Tensor:
        cfg = self.config
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        row_start = None
        if cfg.scorer == "text_rows":
            visual_cur = req.visual.gather(1, req.kept)
            idx = torch.arange(visual_cur.shape[1], device=query.device)
            row_start = (torch.where(visual_cur, idx, -1).amax(1) + 1).clamp(max=visual_cur.shape[1] - 1)
        return key_scores(query, key, attention_mask, scaling, cfg.scorer, cfg.head_reduce, cfg.row_reduce,
                          row_start)

    def select(self, req: Request, hidden: torch.Tensor) -> StepResult:
        """(B, Lcur) bool (True = keep; non-visual slots are always kept) and visual tokens kept per sample."""
        visual = req.present_visual()
        B, Lcur = visual.shape
        if self.config.scorer == "random":
            gen = torch.Generator().manual_seed(self.config.seed)
            score = torch.rand(B, Lcur, generator=gen).to(visual.device)
        else:
            score = req.take_scores(self, "FastV").float()
        score = score.masked_fill(~visual, float("-inf"))
        keep_vis = torch.zeros_like(visual)
        # R is relative to the prompt's visual tokens (so simignore + fastv keep FastV's meaning); an earlier
        # step may already have removed more than that
        counts = list(req.visual_counts)
        targets = [min(visual_keep_count(n, self.config.ratio), c) for n, c in zip(req.prompt_visual_counts, counts)]
        if self.config.grouping == "per_span":
            self._keep = [0] * B
            for b in range(B):
                for start, n in token_spans(visual[b]):
                    k = visual_keep_count(n, self.config.ratio)
                    top = _stable_topk(score[b, start:start + n], k)
                    keep_vis[b, start + top] = True
                    self._keep[b] += k
        else:
            self._keep = targets
            keep_t = device_ints(self._keep, visual.device)
            kmax = max(self._keep)
            order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :kmax]
            chosen = torch.arange(kmax, device=visual.device).unsqueeze(0) < keep_t.unsqueeze(1)
            keep_vis.scatter_(1, order, chosen)
        st = self.stats
        st.num_visual, st.keep_count = counts, list(self._keep)
        mask = torch.zeros(B, req.length + 1, dtype=torch.bool, device=visual.device)
        mask.scatter_(1, torch.where(req.valid, req.kept, req.length), keep_vis)
        st.kept_visual_mask = mask[:, :req.length]
        real = [n - p for n, p in zip(req.lengths, req.padding)]
        if self.mode == "inplace":
            st.pruned_length = [n - (c - k) for n, c, k in zip(real, counts, self._keep)]
        else:
            st.pruned_length = real
        return StepResult(~visual | keep_vis, list(self._keep))

    def finish(self, req: Request, cache_lengths: list[int] | None) -> None:
        self.stats.cache_lengths = cache_lengths
        self.stats.prefills += 1


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices[:k]


class AttachedFastV(AttachedStep):
    def __init__(self, model, adapter, config: FastVConfig):
        T = adapter.num_layers
        if config.k >= T:
            raise ConfigError(f"k must be in [0, {T - 1}] for this model ({T} decoder layers), got {config.k}")
        if adapter.sliding_window_layers():
            raise NotImplementedError("FastV on models with sliding-window layers is not supported")
        if config.positions == "renumber" and adapter.uses_mrope:
            raise ConfigError("positions='renumber' is not defined for M-RoPE models (Qwen2-VL family)")
        inner = (adapter.text_config._attn_implementation or "sdpa")
        if config.mode == "mask" and "flash" in inner:
            raise ConfigError("mode='mask' needs a 4-D attention mask: use attn_implementation 'sdpa' or 'eager'")
        if config.mode == "mask":
            warnings.warn("FastV mode='mask' hides tokens as keys but computes every row: no speedup "
                          "(use mode='inplace' for real savings)", stacklevel=3)
        self.attach_step(model, adapter, FastVStep(config))


@register_method("fastv", family="pruning", config_cls=FastVConfig,
                 summary="FastV: drop the least-attended visual tokens after layer K (inplace or mask)")
def attach_fastv(model, adapter, config: FastVConfig) -> AttachedFastV:
    return AttachedFastV(model, adapter, config)
