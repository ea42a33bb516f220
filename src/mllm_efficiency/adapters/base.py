"""What a method needs to know about a model family, in one place."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core.attachments import cache_kwarg


class ModelAdapter:
    """Locates the decoder stack, its layers and attention modules, and the visual tokens of a prompt.

    `model` is the object the user calls (its forward receives `input_ids`); `text_model` is the decoder
    stack (`LlamaModel`, `Qwen2Model`, ...) with `.layers`, `.norm` and `.rotary_emb`.
    """

    family: str = "decoder"
    uses_mrope: bool = False

    def __init__(self, model: nn.Module, text_model: nn.Module, visual_token_ids: Sequence[int] = ()):
        self.model = model
        self.text_model = text_model
        self.visual_token_ids = tuple(int(t) for t in visual_token_ids if t is not None)
        self.cache_kwarg = cache_kwarg(text_model)

    @property
    def text_config(self):
        return self.text_model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.text_model.layers)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    def sliding_window_layers(self) -> list[int]:
        types = getattr(self.text_config, "layer_types", None) or []
        return [i for i, t in enumerate(types) if t != "full_attention"]

    def global_layers(self) -> list[int]:
        """Layers attending over the whole sequence (every layer unless the config names sliding-window ones)."""
        local = set(self.sliding_window_layers())
        return [i for i in range(self.num_layers) if i not in local]

    def check_method(self, name: str, family: str, config) -> None:
        """Refuse method `name` (registry family `family`) on this model before anything is attached: raise
        `UnsupportedMethodError` naming the model and the reason. Called by `apply`; the default accepts."""

    def check_pruning_step(self, step) -> None:
        """Refuse a token-pruning step (`step.layer`: the first layer that runs on the pruned sequence,
        `step.mode`: "inplace" shrinks the sequence, "mask" keeps it) the family cannot run. Called by the
        pruning engine when a step is attached; the default accepts."""

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Bool (B, L): positions holding an image/video token id, or None if the family knows no such id."""
        if not self.visual_token_ids:
            return None
        mask = input_ids == self.visual_token_ids[0]  # comparisons with host ints: no host-to-device copy
        for token_id in self.visual_token_ids[1:]:
            mask = mask | (input_ids == token_id)
        return mask

    @torch.no_grad()
    def merged_inputs_embeds(self, **inputs) -> torch.Tensor:
        """The `inputs_embeds` the decoder stack would receive for `inputs` (a VLM's vision tower, projector and
        placeholder scatter run; the decoder layers do not): the wrapper's forward is stopped at the decoder's
        entry. For a text LLM this is the token embedding of `input_ids`."""
        if self.model is self.text_model or "pixel_values" not in inputs and "pixel_values_videos" not in inputs:
            return self.text_model.get_input_embeddings()(inputs["input_ids"])

        class _Stop(Exception):
            pass

        seen = {}

        def grab(module, args, kwargs):
            seen["embeds"] = kwargs.get("inputs_embeds")
            raise _Stop

        handle = self.text_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if seen.get("embeds") is None:
            raise RuntimeError(f"{type(self.model).__name__} did not pass inputs_embeds to its decoder")
        return seen["embeds"]

    def describe(self) -> str:
        return f"{self.family} ({type(self.model).__name__}, {self.num_layers} layers)"

    def visual_grids(self, input_ids: torch.Tensor, inputs: dict | None = None,
                     frames: int | None = None) -> list[list[tuple[int, int, int, int]]]:
        """Per sample, the token grid of each visual span as (start, frames, height, width): grid token
        (t, r, c) sits at `start + (t * height + r) * width + c`. Span tokens outside the grid (e.g. the
        video newline LLaVA-OneVision appends) are not described and count as text.

        The grid comes from what the processor gave the model (`inputs`): Qwen-VL `image_grid_thw` /
        `video_grid_thw` (merged by `spatial_merge_size`), LLaVA-OneVision `pixel_values_videos`
        (B, F, C, H, W): F frames of square pooled grids. `frames` overrides the frame count (e.g. when
        only embeddings are given); otherwise a span without processor information is one frame, square
        when its length is a perfect square, else a single row; a span of several adjacent images of the model's
        `image_seq_length` tokens each (LLaVA) is one grid with a frame per image."""
        visual = self.visual_mask(input_ids)
        if visual is None:
            return [[] for _ in range(input_ids.shape[0])]
        inputs = inputs or {}
        cfg = getattr(self.model, "config", None)
        merge = getattr(getattr(cfg, "vision_config", None), "spatial_merge_size", 1) or 1
        video_id = getattr(cfg, "video_token_id", None)
        thw = {"video": _grid_list(inputs.get("video_grid_thw")), "image": _grid_list(inputs.get("image_grid_thw"))}
        videos = inputs.get("pixel_values_videos")
        video_frames = int(videos.shape[1]) if isinstance(videos, torch.Tensor) and videos.dim() == 5 else None
        per_image = getattr(cfg, "image_seq_length", None)
        out = []
        for b in range(input_ids.shape[0]):
            grids = []
            for start, n in token_spans(visual[b]):
                kind = "video" if video_id is not None and int(input_ids[b, start]) == video_id else "image"
                grid = None
                if frames is None and thw[kind]:
                    t, h, w = thw[kind].pop(0)
                    if t * (h // merge) * (w // merge) == n:
                        grid = (start, t, h // merge, w // merge)
                if grid is None:
                    f = frames or (video_frames if kind == "video" else None) or (_image_run(n, per_image) if kind == "image" else None) or 1
                    per = n // f
                    side = int(round(per ** 0.5))
                    grid = (start, f, side, side) if side * side == per else (start, f, 1, per)
                grids.append(grid)
            out.append(grids)
        return out


def _image_run(n: int, per_image) -> int | None:
    """Frames of a span of several adjacent images of `per_image` tokens each (LLaVA: a clip given as
    consecutive images, e.g. the shapes VLM's frames), else None."""
    if isinstance(per_image, int) and 0 < per_image < n and n % per_image == 0:
        return n // per_image
    return None


def _grid_list(t) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in row) for row in t.tolist()] if isinstance(t, torch.Tensor) else []


def token_spans(row: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D bool tensor as (start, length)."""
    r = row.to(torch.int8)
    edges = torch.diff(torch.cat([r.new_zeros(1), r, r.new_zeros(1)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]
