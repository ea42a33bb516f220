"""`random_prune`: the random visual-token pruning baseline of the token-pruning and video papers. A thin
config over FastV's step with `scorer="random"`: at the input of layer K, a seeded uniformly random
`round(N * (1 - ratio))` of the N visual tokens are kept (the same keep rule and engine as FastV; K = 0 drops
them before the first layer). Unlike the KV control `random`, the sequence itself gets shorter (every later
layer computes fewer rows); `random` keeps every token in the prefill and evicts random prompt entries from
the KV cache afterwards. Spec: docs/token_pruning.md."""
from __future__ import annotations

import dataclasses

from ..config import MethodConfig
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
        self.fastv_config()  # FastV's checks, field by field (same names, same messages)

    def fastv_config(self) -> FastVConfig:
        return FastVConfig(scorer="random", **dataclasses.asdict(self))


@register_method("random_prune", family="pruning", config_cls=RandomPruneConfig,
                 summary="random visual-token pruning (the baseline): keep a seeded random round(N*(1-ratio)) of "
                         "the visual tokens from layer K (FastV's step with scorer='random')")
def attach_random_prune(model, adapter, config: RandomPruneConfig) -> AttachedFastV:
    attached = AttachedFastV(model, adapter, config.fastv_config())
    attached.step.method_name = "random_prune"
    return attached
