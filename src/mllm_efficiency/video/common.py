"""What the video methods share: the prompt's grid layout at each fresh prefill, keep selection helpers,
and steps on the pruning engine that delegate to a method object."""
from __future__ import annotations

import torch

from ..core.context import ModelContext
from ..errors import NoVisualTokensError
from ..pruning.engine import PruningStep
from .layout import GridCapture, Layout, build_layout


class PromptLayout:
    """Layout of the current fresh prefill, computed once from the ids and the processor's grid inputs."""

    def __init__(self, adapter, frames: int | None, allow_text_only: bool, what: str):
        self.adapter = adapter
        self.frames = frames
        self.allow_text_only = allow_text_only
        self.what = what
        self.ctx = ModelContext.acquire(adapter)
        self.capture = GridCapture(adapter)
        self._key = None
        self.layout: Layout | None = None

    def get(self, B: int, L: int, device) -> Layout | None:
        ids = self.ctx.input_ids
        if ids is None:
            if self.allow_text_only:
                return None
            raise NoVisualTokensError(f"{self.what}: the forward's input_ids are unknown (embeddings passed "
                                      "directly); call the model with input_ids")
        key = (id(ids), B, L)
        if key != self._key:
            self.layout = build_layout(self.adapter, ids, self.capture.inputs, self.frames)
            self._key = key
            if sum(self.layout.n_grid) == 0 and not self.allow_text_only:
                raise NoVisualTokensError(f"{self.what}: no image or video tokens found in the prompt (pass "
                                          "allow_text_only=True to run such prompts unchanged)")
        return self.layout

    def mask(self, B: int, L: int, device) -> torch.Tensor:
        layout = self.get(B, L, device)
        if layout is None:
            return torch.zeros(B, L, dtype=torch.bool, device=device)
        return layout.mask.to(device)

    def remove(self) -> None:
        self.capture.remove()
        self.ctx.release()


def topk_keep(score: torch.Tensor, candidates: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """(B, Lcur) bool: the `keep[b]` highest-scoring candidates per sample (stable: earlier wins ties)."""
    score = score.float().masked_fill(~candidates, float("-inf"))
    kmax = max(keep) if keep else 0
    out = torch.zeros_like(candidates)
    if kmax == 0:
        return out
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :kmax]
    if min(keep) == kmax:  # every sample keeps kmax (batch 1): no host-to-device copy (a stream sync on CUDA)
        return out.scatter_(1, order, True)
    chosen = torch.arange(kmax, device=score.device)[None, :] < torch.tensor(keep, device=score.device)[:, None]
    return out.scatter_(1, order, chosen)


class DelegateStep(PruningStep):
    """A step on the pruning engine at decoder layer `layer` whose decisions belong to `owner`:
    owner.step_plan(step, visual, counts), owner.step_score(step, req, module, q, k, mask, kwargs),
    owner.step_select(step, req, hidden) -> StepResult, owner.step_finish(step, req, cache_lengths)."""

    def __init__(self, owner, layer: int, score_layer: int | None, tag=None):
        self.owner = owner
        self.layer = layer
        self.score_layer = score_layer
        self.tag = tag

    @property
    def method_name(self) -> str:
        return getattr(self.owner, "method_name", type(self.owner).__name__)

    @property
    def fast_decode(self) -> bool:
        """Whether the fast path's slot decoder reproduces this method's decode steps (see fast.support)."""
        return getattr(self.owner, "fast_decode", True)

    def visual_positions(self, detected, B, L, device):
        return self.owner.layout_source.mask(B, L, device)

    def plan(self, visual, counts, real_lengths) -> bool:
        return self.owner.step_plan(self, visual, counts)

    def score(self, req, module, query, key, attention_mask, kwargs):
        return self.owner.step_score(self, req, module, query, key, attention_mask, kwargs)

    def select(self, req, hidden):
        return self.owner.step_select(self, req, hidden)

    def finish(self, req, cache_lengths) -> None:
        self.owner.step_finish(self, req, cache_lengths)


def current_visual(req) -> torch.Tensor:
    """(B, Lcur) bool: slots holding a surviving grid token."""
    return req.visual.gather(1, req.kept) & req.valid
