"""Video token concentration: Focus, FrameFusion, CMC, AdapTiV (registered on import), sparse traces.
Spec: shared/design/VIDEO.md."""
from . import adaptiv, cmc, focus, framefusion  # noqa: F401  (register the methods)

__all__ = ["adaptiv", "cmc", "focus", "framefusion"]
