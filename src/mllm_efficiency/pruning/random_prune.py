"""`random_prune`: the random visual-token pruning baseline of the token-pruning and video papers. A thin
config over FastV's step with `scorer="random"`: at the input of layer K, a seeded uniformly random
`round(N * (1 - ratio))` of the N visual tokens are kept (the same keep rule and engine as FastV; K = 0 drops
them before the first layer). Unlike the KV control `random`, the sequence itself gets shorter (every later
layer computes fewer rows); `random` keeps every token in the prefill and evicts random prompt entries from
the KV cache afterwards. Spec: docs/token_pruning.md."""
from __future__ import annotations

import dataclasses

from ..config import MethodConfig, check_choice, check_int, check_ratio
from ..errors import ConfigError
from ..registry import register_method
from .fastv import AttachedFastV, FastVConfig


@dataclasses.dataclass(frozen=True)
class RandomPruneConfig(MethodConfig):
    k: int = 2  # FastV's default layer: equal FLOPs to FastV at the same ratio
    ratio: float = 0.5  # fraction of visual tokens removed from layer k on
    mode: str = "inplace"
    seed: int = 0
    image_token_start_index: int | None = None
    image_token_length: int | None = None
    allow_text_only: bool = False

    def validate(self) -> None:
        check_int("k", self.k, 0)
        check_ratio("ratio", self.ratio)
        check_choice("mode", self.mode, ("inplace", "mask"))
        check_int("seed", self.seed)
        if (self.image_token_start_index is None) != (self.image_token_length is None):
            raise ConfigError("image_token_start_index and image_token_length must be given together")
        if self.image_token_start_index is not None:
            check_int("image_token_start_index", self.image_token_start_index, 0)
            check_int("image_token_length", self.image_token_length, 1)

    def fastv_config(self) -> FastVConfig:
        return FastVConfig(scorer="random", **dataclasses.asdict(self))


@register_method("random_prune", family="pruning", config_cls=RandomPruneConfig,
                 summary="random visual-token pruning (the baseline): keep a seeded random round(N*(1-ratio)) of "
                         "the visual tokens from layer K (FastV's step with scorer='random')")
def attach_random_prune(model, adapter, config: RandomPruneConfig) -> AttachedFastV:
    attached = AttachedFastV(model, adapter, config.fastv_config())
    attached.step.method_name = "random_prune"
    return attached
