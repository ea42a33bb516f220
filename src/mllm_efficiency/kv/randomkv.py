"""Random baseline: the window plus uniformly random earlier tokens, independently per KV head. Seeded per
(seed, layer) and drawn over each sample's own real tokens, so a padded batch keeps what single runs keep."""
from __future__ import annotations

import dataclasses

import torch

from ..config import check_int
from . import primitives as P
from .base import KVConfig, LayerInput, Policy, Selection
from .method import kv_method


@dataclasses.dataclass(frozen=True)
class RandomKVConfig(KVConfig):
    window: int = 32
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        check_int("window", self.window, 0)
        check_int("seed", self.seed)


@kv_method("random", config=RandomKVConfig,
           summary="Random: window + uniformly random earlier tokens per KV head (baseline)")
class RandomKVPolicy(Policy):
    def select(self, inp: LayerInput) -> Selection:
        cfg = self.config
        window = inp.window_mask([P.window_size(cfg.window, k, self.name) for k in inp.keep])
        B, Hkv, S = inp.key.shape[:3]
        score = torch.zeros(B, Hkv, S)
        real = inp.real.cpu()
        for b in range(B):
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + inp.layer)
            slots = real[b].nonzero().flatten()
            score[b][:, slots] = torch.rand(Hkv, slots.numel(), generator=gen)
        score = score.to(inp.key.device)
        return Selection(score, (inp.real & ~window)[:, None], window[:, None], inp.keep)
