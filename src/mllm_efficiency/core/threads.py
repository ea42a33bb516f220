"""Refuse concurrent forwards on one model with a method attached.

The methods keep per-forward state on the model (current input ids, the prefill being pruned or compressed,
captured projections), so two forwards in flight at once from different threads would mix their state. The
guard counts forwards in flight per thread; a forward entered while another thread has one in flight raises.
Nested forwards of the same thread (a VLM calling its decoder, a probe inside a forward) are fine.
"""
from __future__ import annotations

import threading

from torch import nn


class ForwardGuard:
    def __init__(self, model: nn.Module):
        self.model_name = type(model).__name__
        self._lock = threading.Lock()
        self._depth: dict[int, int] = {}  # thread id -> forwards in flight

    def install(self, *modules: nn.Module) -> list:
        """Hooks on `modules` (outermost first); returns their handles."""
        handles = []
        for m in modules:
            handles.append(m.register_forward_pre_hook(self._enter, prepend=True))
            handles.append(m.register_forward_hook(self._leave, always_call=True))
        return handles

    def _enter(self, module, args):
        me = threading.get_ident()
        with self._lock:
            busy = [t for t, n in self._depth.items() if n and t != me]
            if busy:
                raise RuntimeError(
                    f"{self.model_name} with an efficiency method attached is already running a forward in another "
                    "thread; concurrent use of one model is not supported: use one model (and one apply) per thread")
            self._depth[me] = self._depth.get(me, 0) + 1

    def _leave(self, module, args, output):
        me = threading.get_ident()
        with self._lock:
            n = self._depth.get(me, 0)
            if n <= 1:
                self._depth.pop(me, None)  # also a refused entry (always_call hooks run after a pre-hook raised)
            else:
                self._depth[me] = n - 1
