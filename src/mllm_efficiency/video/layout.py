"""Visual layout of a prompt (docs/video.md): token grids per sample, from the adapter.

`GridCapture` remembers what the processor gave the outer model (`video_grid_thw`, `pixel_values_videos`, ...)
so that the decoder stack, which only sees embeddings, can ask the adapter for the grid of every visual span.

`generate()` (transformers 5.24) runs the vision encoders itself before the prefill
(`get_image_features` / `get_video_features` of the base model) and then calls the forward with
`mm_encoder_outputs` instead of the pixel and grid inputs, which it removes from the forward's kwargs. So the
capture also records what those encoder calls were given (`_EncoderRecorder`) and, for a forward that brings
`mm_encoder_outputs`, uses the grid inputs of the calls that produced exactly those outputs. Without that,
`model.generate` saw no grid information: an 8-frame OneVision video became one 1x33 "frame" (newline token
included) and FrameFusion, Focus, CMC and AdapTiV selected on that layout, unlike the model's own forward.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import weakref

import torch

from ..core.attachments import PREFIX

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
        self._recorder = None
        if adapter.model is not adapter.text_model:
            self._handle = adapter.model.register_forward_pre_hook(self._hook, with_kwargs=True)
            self._recorder = _EncoderRecorder.acquire(adapter.model)

    def _hook(self, module, args, kwargs):
        found = {k: kwargs[k] for k in _GRID_KEYS if isinstance(kwargs.get(k), torch.Tensor)}
        encoded = kwargs.get("mm_encoder_outputs")
        if not found and encoded and self._recorder is not None:  # generate() encoded the pixels beforehand
            found = self._recorder.inputs_for(encoded)
        if found or kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] > 1:
            self.inputs = found
        return None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._recorder is not None:
            self._recorder.release()
            self._recorder = None


_RECORDER = PREFIX + "_encoder_recorder"
_ENCODERS = ("get_image_features", "get_video_features")


class _EncoderRecorder:
    """Shared by every `GridCapture` of a model: wraps the base model's `get_image_features` /
    `get_video_features` (what `generate()` calls before the prefill) to remember, per modality, the grid
    inputs of the last call and (weakly) the output it returned."""

    def __init__(self, base):
        self.base = base
        self.users = 0
        self.records: dict = {}  # modality -> (weakref to the encoder output, {grid key: tensor})

    @classmethod
    def acquire(cls, model) -> "_EncoderRecorder":
        base = getattr(model, "base_model", model)
        rec = vars(base).get(_RECORDER)
        if rec is None:
            rec = cls(base)
            setattr(base, _RECORDER, rec)
            for name in _ENCODERS:
                if callable(getattr(base, name, None)) and name not in vars(base):
                    # a bound method (deep copies of the model rebind it to the copy)
                    setattr(base, name, types.MethodType(_recording_encoder(type(base), name), base))
        rec.users += 1
        return rec

    def release(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        base = self.base
        if vars(base).get(_RECORDER) is self:
            delattr(base, _RECORDER)
            for name in _ENCODERS:
                fn = vars(base).get(name)
                if getattr(getattr(fn, "__func__", None), "_mllm_eff_encoder", None) == name:
                    delattr(base, name)

    def record(self, name: str, kwargs: dict, output) -> None:
        found = {k: kwargs[k] for k in _GRID_KEYS if isinstance(kwargs.get(k), torch.Tensor)}
        try:
            ref = weakref.ref(output)
        except TypeError:
            return
        self.records[name[len("get_"):-len("_features")]] = (ref, found)

    def inputs_for(self, encoded: dict) -> dict:
        """The grid inputs of the encoder calls whose outputs `encoded` (a forward's `mm_encoder_outputs`) holds."""
        found = {}
        for modality, output in encoded.items():
            ref, inputs = self.records.get(modality, (None, None))
            if ref is not None and output is not None and ref() is output:
                found.update(inputs)
        return found


def _recording_encoder(cls, name: str):
    def encoder(self, *args, **kwargs):
        output = getattr(type(self), name)(self, *args, **kwargs)
        rec = vars(self).get(_RECORDER)
        if rec is not None:
            rec.record(name, kwargs, output)
        return output

    # generate() passes an encoder the model kwargs its signature names: keep the original signature
    functools.update_wrapper(encoder, getattr(cls, name))
    encoder._mllm_eff_encoder = name
    return encoder
