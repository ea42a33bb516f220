"""StreamingLLM (arXiv 2309.17453): keep the first `n_sink` tokens (attention sinks) and the most recent
`keep - n_sink`. No scores. `decode="window"` holds the cache at its budget while decoding by evicting the
oldest non-sink token. Keys keep their original rotation (no re-rotation into cache positions)."""
from __future__ import annotations

import dataclasses

import torch

from ..config import check_int
from . import primitives as P
from .base import KVConfig, LayerInput, Policy, Selection
from .method import kv_method
from ..core.device import device_ints


@dataclasses.dataclass(frozen=True)
class StreamingLLMConfig(KVConfig):
    n_sink: int = 4

    decode_modes = ("none", "window")

    def validate(self) -> None:
        super().validate()
        check_int("n_sink", self.n_sink, 0)


@kv_method("streamingllm", config=StreamingLLMConfig,
           summary="StreamingLLM: keep attention sinks + the most recent tokens (decode='window' evicts)")
class StreamingLLMPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        sinks = [min(self.config.n_sink, k) for k in inp.keep]
        recent = [k - s for k, s in zip(inp.keep, sinks)]
        dev = inp.real.device
        protected = P.first_real(inp.real, device_ints(sinks, dev)) | inp.window_mask(recent)
        zeros = torch.zeros(protected.shape, device=dev)
        return Selection(zeros[:, None], inp.real[:, None], protected[:, None], inp.keep)

    def decode_scores(self, layer, real):
        # keep the newest: the score is the original position; sinks are protected
        B = real.shape[0]
        pos = layer.slot_positions(batch=B)
        pos = pos.expand(B, *pos.shape[1:])
        pos = pos.unsqueeze(1) if pos.dim() == 2 else pos
        sinks = device_ints([min(self.config.n_sink, b) for b in layer.budget], real.device)
        return pos.float(), P.first_real(real, sinks)
