"""Video input: sample N frames uniformly from a file with PyAV (`pip install av`, imported lazily), then let
the model's own processor turn them into `pixel_values_videos`."""
from __future__ import annotations

import numpy as np


def uniform_indices(total: int, n: int) -> list[int]:
    """`n` frame indices spread uniformly over `total` frames (centres of n equal segments)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {n!r}")
    if total < 1:
        raise ValueError("the video has no frames")
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def sample_frames(path: str, num_frames: int) -> np.ndarray:
    """(num_frames, H, W, 3) uint8 RGB frames sampled uniformly from the video at `path`."""
    try:
        import av
    except ImportError as e:
        raise ImportError("reading video files needs PyAV: pip install av") from e
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    idx = uniform_indices(len(frames), num_frames)
    return np.stack([frames[i] for i in idx])


def processor_inputs(processor, path: str, num_frames: int, text: str) -> dict:
    """Model inputs from the model's own processor (e.g. LlavaOnevisionProcessor, Qwen2_5_VLProcessor)."""
    video = sample_frames(path, num_frames)
    return processor(text=text, videos=[video], return_tensors="pt")
