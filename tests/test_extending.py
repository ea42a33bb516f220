"""README "Extending": a new KV method is a config dataclass plus one `select`, registered by `kv_method`."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mllm_efficiency as me
from conftest import cache_of
from mllm_efficiency import registry
from mllm_efficiency.config import check_int
from mllm_efficiency.kv import KVConfig, LayerInput, Policy, Selection, kept_positions, kv_method
from mllm_efficiency.kv.primitives import prompt_keep_count
from mllm_efficiency.testing import tiny_llama_lm

NAME = "test_channel_score"


@pytest.fixture
def channel_method():
    """Registers a KV method scoring every key by a formula (its channel `channel`, after RoPE); removed after."""

    @dataclasses.dataclass(frozen=True)
    class ChannelConfig(KVConfig):
        channel: int = 0

        def validate(self) -> None:
            super().validate()
            check_int("channel", self.channel, 0)

    @kv_method(NAME, config=ChannelConfig, summary="keep the keys with the largest value of one channel")
    class ChannelPolicy(Policy):
        def select(self, inp: LayerInput) -> Selection:
            score = inp.key[..., self.config.channel].float()  # (B, Hkv, S)
            nothing = torch.zeros_like(inp.real)[:, None]
            return Selection(score, inp.real[:, None], nothing, inp.keep)

    yield ChannelConfig
    registry._REGISTRY.pop(NAME)


def test_a_registered_kv_method_runs(channel_method):
    assert NAME in me.available_methods("kv")
    model = tiny_llama_lm()
    L, ratio, channel = 24, 0.5, 3
    ids = torch.randint(3, 100, (1, L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = cache_of(model(input_ids=ids, use_cache=True))
        with me.apply(model, NAME, ratio=ratio, channel=channel) as h:
            cache = cache_of(model(input_ids=ids, use_cache=True))
    keep = prompt_keep_count(L, ratio)
    assert h.stats.kept[0] == [keep]
    for i, layer in enumerate(full.layers):
        for head in range(layer.keys.shape[1]):
            ref = torch.topk(layer.keys[0, head, :, channel].float(), keep).indices.sort().values.tolist()
            assert kept_positions(cache, i, 0, head) == ref, (i, head)
    with pytest.raises(ValueError, match="channel"):
        me.apply(model, NAME, channel=-1)
