"""The handle `apply()` returns: removable, usable as a context manager, exposes `.stats`."""
from __future__ import annotations

import weakref
from typing import Any, Callable


class MethodHandle:
    def __init__(self, name: str, config: Any, attached: Any, model: Any = None,
                 on_remove: Callable[[], None] | None = None):
        self._model = weakref.ref(model) if model is not None else None
        self.name = name
        self._on_remove = on_remove
        self.config = config
        self._attached = attached
        self._removed = False

    @property
    def stats(self):
        return self._attached.stats

    def __getattr__(self, name: str):
        # method-specific calls (e.g. SimIgnore's set_text) live on the attached object
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._attached, name)

    def generate(self, **kwargs):
        """`mllm_efficiency.generate` on the model this method is attached to (greedy decoding, fast path)."""
        from .fast.generate import generate

        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError(f"{self.name}: the handle does not know its model (created outside apply())")
        return generate(model, **kwargs)

    @property
    def active(self) -> bool:
        return not self._removed

    def remove(self) -> None:
        """Detach the method; the model is exactly as before `apply()`. Safe to call twice."""
        if not self._removed:
            self._attached.remove()
            self._removed = True
            if self._on_remove is not None:
                self._on_remove()

    def __enter__(self) -> "MethodHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "active"
        return f"MethodHandle({self.name}, {state}, config={self.config})"
