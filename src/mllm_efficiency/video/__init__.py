"""Video token concentration: Focus, FrameFusion, CMC, AdapTiV (registered on import), sparse traces.
Spec: docs/video.md."""
from . import adaptiv, cmc, focus, framefusion  # noqa: F401  (register the methods)

__all__ = ["adaptiv", "cmc", "focus", "framefusion"]
