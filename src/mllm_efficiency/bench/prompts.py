"""Synthetic benchmark prompts of a given shape: images x tokens per image, video frames, text context, batch.

The visual-token count of each image or video comes from the model's own feature functions (one vision pass
at build time), so the placeholders always match what the model's forward merges in. Every row of the batch
is the same prompt: no padding, so all rows share one length and one position range.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

import torch

from ..adapters import get_adapter
from ..errors import ConfigError

VLM_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class PromptShape:
    """`context` text tokens (split into a prefix before the visuals and the rest after them), plus `images`
    images of `tokens_per_image` tokens and one video of `frames` frames; `batch` identical rows."""

    context: int = 64
    images: int = 0
    tokens_per_image: int | None = None
    frames: int = 0
    batch: int = 1

    def __post_init__(self) -> None:
        for name, low in (("context", 1), ("images", 0), ("frames", 0), ("batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        tpi = self.tokens_per_image
        if tpi is not None and (isinstance(tpi, bool) or not isinstance(tpi, int) or tpi < 1
                                or math.isqrt(tpi) ** 2 != tpi):
            raise ConfigError(f"tokens_per_image must be a perfect square >= 1 (a square patch grid), got {tpi!r}")

    @property
    def has_visuals(self) -> bool:
        return self.images > 0 or self.frames > 0

    def describe(self) -> str:
        parts = []
        if self.images:
            parts.append(f"{self.images} image{'s' if self.images > 1 else ''}"
                         + (f" x {self.tokens_per_image}" if self.tokens_per_image else ""))
        if self.frames:
            parts.append(f"{self.frames}-frame video")
        parts.append(f"{self.context} text tokens")
        if self.batch > 1:
            parts.append(f"batch {self.batch}")
        return ", ".join(parts)


@dataclasses.dataclass
class Prompt:
    inputs: dict  # keyword arguments of the model's forward
    length: int  # tokens per row
    visual_tokens: int  # visual placeholder tokens per row
    vision: Callable[[], Any] | None  # runs the vision encoder(s) on this prompt's pixels; None without pixels

    @property
    def batch(self) -> int:
        return int(self.inputs["input_ids"].shape[0])


def build_prompt(model, shape: PromptShape, device, dtype, seed: int = 0) -> Prompt:
    """Inputs of `shape` for `model` (a text LM or a supported VLM), on `device`; pixel values in `dtype`."""
    adapter = get_adapter(model)
    family = adapter.family if adapter.family in VLM_FAMILIES else "text"
    if shape.has_visuals and family == "text":
        raise ConfigError(f"images/frames need a vision-language model; {type(model).__name__} is text-only "
                          "(use a VLM preset such as llava-1.5-7b, llava-onevision-7b or qwen2-vl-7b)")
    g = torch.Generator().manual_seed(seed)
    vocab = adapter.text_config.vocab_size
    low, high = 3, max(4, min(vocab - 8, 32000))  # text ids: never a special or visual token

    def text(n: int) -> list[int]:
        return torch.randint(low, high, (n,), generator=g).tolist()

    prefix_len = min(36, shape.context // 2) if shape.has_visuals else 0
    prefix, suffix = text(prefix_len), text(shape.context - prefix_len)
    visual: list[int] = []
    pixels: dict = {}
    calls: list[Callable[[], Any]] = []
    if shape.has_visuals:
        builder = {"llava": _llava, "llava_next": _llava, "llava_onevision": _onevision,
                   "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_vl}[family]
        visual, pixels, calls = builder(model, shape, device, dtype, g)
    ids = torch.tensor([prefix + visual + suffix], device=device).expand(shape.batch, -1).contiguous()
    inputs = {"input_ids": ids, **pixels}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        cfg = model.config
        types = torch.zeros_like(ids, dtype=torch.int)
        types[ids == cfg.image_token_id] = 1
        types[ids == cfg.video_token_id] = 2
        inputs["mm_token_type_ids"] = types
    n_visual = int(adapter.visual_mask(ids[:1]).sum()) if shape.has_visuals else 0

    def vision() -> None:
        for call in calls:
            call()

    return Prompt(inputs=inputs, length=int(ids.shape[1]), visual_tokens=n_visual,
                  vision=vision if calls else None)


def _call(fn, **kwargs):
    """`fn(**kwargs)` with only the keywords it accepts (names moved between transformers 5.x releases)."""
    params = inspect.signature(fn).parameters
    if "pixel_values_videos" in kwargs and "pixel_values_videos" not in params:
        kwargs["pixel_values"] = kwargs.pop("pixel_values_videos")
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def _count(features) -> list[int]:
    feats = getattr(features, "pooler_output", features)
    if isinstance(features, tuple) and not isinstance(feats, torch.Tensor) and len(features) and \
            isinstance(features[0], (list, tuple, torch.Tensor)):
        feats = features[0] if not isinstance(features[0], torch.Tensor) or features[0].dim() == 3 else features
    if isinstance(feats, torch.Tensor):
        return [int(feats.shape[-2])] * int(feats.shape[0]) if feats.dim() == 3 else [int(feats.shape[0])]
    return [int(f.shape[0]) for f in feats]


def _llava(model, shape: PromptShape, device, dtype, g):
    if shape.frames:
        raise ConfigError(f"frames: {type(model).__name__} takes no video input; use images, or a video model "
                          "(llava-onevision-7b, qwen2-vl-7b)")
    side = model.config.vision_config.image_size
    _check_side(model, shape, side)
    pv = torch.randn(shape.images, 3, side, side, generator=g).to(device, dtype)
    inner = model.model
    with torch.inference_mode():
        per = _count(_call(inner.get_image_features, pixel_values=pv))
    token = model.config.image_token_id
    visual = [t for n in per for t in [token] * n]
    batch_pv = pv.repeat(shape.batch, 1, 1, 1)
    call = (lambda: _call(inner.get_image_features, pixel_values=batch_pv))
    return visual, {"pixel_values": batch_pv}, [call]


def _onevision(model, shape: PromptShape, device, dtype, g):
    side = model.config.vision_config.image_size
    _check_side(model, shape, side)
    inner, cfg = model.model, model.config
    visual, pixels, calls = [], {}, []
    if shape.images:
        # one anyres tile of the image's own size: base view + 1 tile per image
        pv = torch.randn(shape.images, 2, 3, side, side, generator=g).to(device, dtype)
        sizes = torch.tensor([[side, side]] * shape.images, device=device)
        with torch.inference_mode():
            per = _count(_call(inner.get_image_features, pixel_values=pv, image_sizes=sizes))
        visual += [t for n in per for t in [cfg.image_token_id] * n]
        bpv, bsz = pv.repeat(shape.batch, 1, 1, 1, 1), sizes.repeat(shape.batch, 1)
        pixels.update(pixel_values=bpv, image_sizes=bsz)
        calls.append(lambda: _call(inner.get_image_features, pixel_values=bpv, image_sizes=bsz))
    if shape.frames:
        video = torch.randn(1, shape.frames, 3, side, side, generator=g).to(device, dtype)
        with torch.inference_mode():
            per = _count(_call(inner.get_video_features, pixel_values_videos=video))
        n = sum(per)
        if "pixel_values_videos" not in inspect.signature(inner.get_video_features).parameters:
            n += 1  # before transformers 5.24 the forward appends the video newline after get_video_features
        visual += [cfg.video_token_id] * n
        bvid = video.repeat(shape.batch, 1, 1, 1, 1)
        pixels["pixel_values_videos"] = bvid
        calls.append(lambda: _call(inner.get_video_features, pixel_values_videos=bvid))
    return visual, pixels, calls


def _qwen2_vl(model, shape: PromptShape, device, dtype, g):
    cfg, inner = model.config, model.model
    vc = cfg.vision_config
    merge, patch, tp = vc.spatial_merge_size, vc.patch_size, vc.temporal_patch_size
    side = math.isqrt(shape.tokens_per_image or 729) * merge  # patches per side before the merge
    row = vc.in_channels * tp * patch * patch
    visual, pixels, calls = [], {}, []

    def span(token: int, t: int) -> list[int]:
        return [cfg.vision_start_token_id] + [token] * (t * side * side // (merge * merge)) + [cfg.vision_end_token_id]

    if shape.images:
        grid = torch.tensor([[1, side, side]] * shape.images, device=device)
        pv = torch.randn(shape.images * side * side, row, generator=g).to(device, dtype)
        visual += [t for _ in range(shape.images) for t in span(cfg.image_token_id, 1)]
        bpv, bgrid = pv.repeat(shape.batch, 1), grid.repeat(shape.batch, 1)
        pixels.update(pixel_values=bpv, image_grid_thw=bgrid)
        calls.append(lambda: _call(inner.get_image_features, pixel_values=bpv, image_grid_thw=bgrid))
    if shape.frames:
        if shape.frames % tp:
            raise ConfigError(f"frames must be a multiple of the temporal patch size {tp} for "
                              f"{type(model).__name__}, got {shape.frames}")
        t = shape.frames // tp
        grid = torch.tensor([[t, side, side]], device=device)
        pv = torch.randn(t * side * side, row, generator=g).to(device, dtype)
        visual += span(cfg.video_token_id, t)
        bpv, bgrid = pv.repeat(shape.batch, 1), grid.repeat(shape.batch, 1)
        pixels.update(pixel_values_videos=bpv, video_grid_thw=bgrid)
        calls.append(lambda: _call(inner.get_video_features, pixel_values_videos=bpv, video_grid_thw=bgrid))
    return visual, pixels, calls


def _check_side(model, shape: PromptShape, side: int) -> None:
    if shape.tokens_per_image is None:
        return
    patch = model.config.vision_config.patch_size
    if (side // patch) ** 2 != shape.tokens_per_image:
        raise ConfigError(f"tokens_per_image={shape.tokens_per_image} does not match this model's vision tower "
                          f"({side} px images, patch {patch}: {(side // patch) ** 2} tokens per image)")
