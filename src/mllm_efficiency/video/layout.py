"""Visual layout of a prompt (docs/video.md): token grids per sample, from the adapter.

`GridCapture` remembers what the processor gave the outer model (`video_grid_thw`, `pixel_values_videos`, ...)
so that the decoder stack, which only sees embeddings, can ask the adapter for the grid of every visual span.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

_GRID_KEYS = ("video_grid_thw", "image_grid_thw", "pixel_values_videos")


@dataclasses.dataclass(frozen=True)
class Grid:
    """One visual span's token grid: token (t, r, c) sits at sequence index `start + (t*height + r)*width + c`."""

    start: int
    frames: int
    height: int
    width: int

    @property
    def size(self) -> int:
        return self.frames * self.height * self.width


@dataclasses.dataclass
class Layout:
    """Grids of every sample plus the map original position -> grid token index (-1 = text / non-grid)."""

    grids: list[list[Grid]]
    grid_index: torch.Tensor  # (B, L) long
    n_grid: list[int]  # grid tokens per sample

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """(B, L) bool: grid tokens. One tensor per layout, so that the pruning engine sees the same visual mask
        for every step of a method and counts it once (`grid_index` is never modified)."""
        return self.grid_index >= 0

    def describe(self, b: int = 0) -> dict:
        g = self.grids[b]
        return {"grids": [dataclasses.asdict(x) for x in g], "n_visual": self.n_grid[b],
                "visual_start": g[0].start if g else None, "n_frames": sum(x.frames for x in g)}


def build_layout(adapter, input_ids: torch.Tensor, inputs: dict | None, frames: int | None = None) -> Layout:
    B, L = input_ids.shape
    grids = [[Grid(*g) for g in row] for row in adapter.visual_grids(input_ids, inputs, frames=frames)]
    index = torch.full((B, L), -1, dtype=torch.long)
    counts = []
    for b, row in enumerate(grids):
        n = 0
        for g in row:
            index[b, g.start:g.start + g.size] = torch.arange(n, n + g.size)
            n += g.size
        counts.append(n)
    return Layout(grids, index.to(input_ids.device), counts)


class GridCapture:
    """Forward pre-hook on the user-facing model that keeps the processor's grid information of the call."""

    def __init__(self, adapter):
        self.inputs: dict = {}
        self._handle = None
        if adapter.model is not adapter.text_model:
            self._handle = adapter.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        found = {k: kwargs[k] for k in _GRID_KEYS if isinstance(kwargs.get(k), torch.Tensor)}
        if found or kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:
            self.inputs = found
        return None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
