"""L2-norm compression (arXiv 2406.11430, kvpress `KnormPress`): keep the tokens whose key has the smallest
L2 norm, per KV head (RoPE preserves norms, so stored post-RoPE keys give the same ranking). No attention
is needed. Layers 0 and 1 are left uncompressed by default (`skip_layers=(0, 1)`, as the paper);
`skip_layers=()` is kvpress's Knorm. No protected window by default."""
from __future__ import annotations

import dataclasses

from ..config import check_int, check_layer_indices
from ..errors import ConfigError
from . import primitives as P
from .base import KVConfig, LayerInput, Policy, Selection
from .method import kv_method


@dataclasses.dataclass(frozen=True)
class L2NormConfig(KVConfig):
    skip_layers: tuple = (0, 1)
    window: int = 0

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.skip_layers, (tuple, list)):
            raise ConfigError(f"skip_layers must be a tuple of layer indices, got {self.skip_layers!r}")
        for n, i in enumerate(self.skip_layers):
            check_int(f"skip_layers[{n}]", i, 0)
        check_int("window", self.window, 0)


@kv_method("l2norm", config=L2NormConfig,
           summary="L2Norm/Knorm: keep the tokens with the smallest key norm (no attention needed)")
class L2NormPolicy(Policy):
    def check_model(self, adapter) -> None:
        check_layer_indices("skip_layers", self.config.skip_layers, adapter.num_layers)

    def select(self, inp: LayerInput) -> Selection | None:
        cfg = self.config
        if inp.layer in cfg.skip_layers:
            return None
        window = inp.window_mask([P.window_size(cfg.window, k, self.name) for k in inp.keep])
        score = -inp.key.float().norm(dim=-1)  # (B, Hkv, S): smallest norm first
        return Selection(score, (inp.real & ~window)[:, None], window[:, None], inp.keep)
