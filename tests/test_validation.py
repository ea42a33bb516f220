"""Config validation shared by every method: no NaN/±inf numbers, real bools only, indices checked against the
model, allocation sizes bounded before anything is allocated, FrameFusion's too-small cost."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mllm_efficiency as me
from conftest import model_state
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.registry import method_specs

NAN, INF = float("nan"), float("inf")


def _fields(kind: str):
    out = []
    for spec in method_specs():
        for f in dataclasses.fields(spec.config_cls):
            ann = str(f.type)
            if (kind == "bool" and ann.startswith("bool")) or (kind == "float" and "float" in ann):
                out.append((spec.name, f.name))
    return out


@pytest.mark.parametrize("method,field", _fields("float"))
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_every_float_field_rejects_nan_and_inf(method, field, value):
    spec = me.get_method(method)
    with pytest.raises(ConfigError, match=field):
        spec.config_cls.from_kwargs(method, **{field: value})


@pytest.mark.parametrize("method,field", _fields("bool"))
@pytest.mark.parametrize("value", ["no", 1, 0])
def test_every_bool_field_takes_only_bools(method, field, value):
    spec = me.get_method(method)
    with pytest.raises(ConfigError, match=field):
        spec.config_cls.from_kwargs(method, **{field: value})


@pytest.mark.parametrize("method,kw", [
    ("qllm", dict(base=NAN)), ("qllm", dict(question_weight=INF)), ("infllm", dict(score_decay=NAN)),
    ("infllm", dict(distance_scale=INF)), ("cmc", dict(fc_threshold=NAN)), ("cmc", dict(query_threshold=INF)),
    ("pyramidkv", dict(beta=INF)), ("adakv", dict(beta=INF)), ("lookm", dict(text_prior="no")),
    ("vlcache", dict(layer_adaptive=1)), ("infllm", dict(pin_memory="no")),
])
def test_reported_bad_values_are_refused_naming_the_field(llama_text, method, kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        me.apply(llama_text, method, **kw)


def test_range_messages_name_the_interval():
    with pytest.raises(ConfigError, match=r"base must be in \(1.0, inf\) \(a finite number\), got nan"):
        me.get_method("qllm").config_cls(base=NAN)
    with pytest.raises(ConfigError, match=r"fc_threshold must be in \[0.0, inf\) \(a finite number\)"):
        me.get_method("cmc").config_cls(fc_threshold=INF)


def test_l2norm_skip_layers_checked_against_the_model(llama_text):
    before = model_state(llama_text)
    with pytest.raises(ConfigError, match=r"skip_layers\[0\] = 99 .*\[0, 3\]"):
        me.apply(llama_text, "l2norm", skip_layers=(99,))
    assert model_state(llama_text) == before
    with me.apply(llama_text, "l2norm", skip_layers=(3,)):
        pass


def test_simignore_text_token_ids():
    cfg = me.get_method("simignore").config_cls
    with pytest.raises(ConfigError, match="text_token_ids is used only with text_source='explicit'"):
        cfg(text_source="prompt", text_token_ids=(5, 6))
    with pytest.raises(ConfigError, match="text_token_ids must be a non-empty sequence"):
        cfg(text_source="explicit", text_token_ids=5)
    with pytest.raises(ConfigError, match="text_token_ids"):
        cfg(text_source="explicit", text_token_ids=(True, 3))
    assert cfg(text_source="explicit", text_token_ids=[5, 6]).text_token_ids == (5, 6)


@pytest.mark.parametrize("kw,field", [(dict(n_init=10 ** 9), "n_init"),
                                      (dict(max_cached_block=10 ** 6, topk=8), "max_cached_block")])
def test_memory_sizes_bounded_before_allocating(llama_text, kw, field):
    before = model_state(llama_text)
    with pytest.raises(ConfigError, match=field):
        me.apply(llama_text, "qllm", on_missing_question="infllm", **kw)
    assert model_state(llama_text) == before


def test_framefusion_cost_too_small_is_a_clear_error(ov, ov_prompt):
    """No frame merges (similarity bound 1): layer 0 runs all tokens, 4 * 0.2 < 1 layer-equivalent left."""
    with torch.no_grad():
        ref = ov(**ov_prompt).logits
    with me.apply(ov, "framefusion", cost=0.2, similarity_lower_bound=1.0):
        with pytest.raises(ConfigError, match="the cost is too small.*cost >= 0.25"), torch.no_grad():
            ov(**ov_prompt)
    with torch.no_grad():
        assert torch.equal(ov(**ov_prompt).logits, ref)
    with me.apply(ov, "framefusion", cost=0.25, similarity_lower_bound=1.0), torch.no_grad():
        ov.generate(**ov_prompt, max_new_tokens=2, do_sample=False)


def test_prune_ratio_raises_like_the_authors():
    from mllm_efficiency.video.framefusion import prune_ratio

    with pytest.raises(ConfigError, match="cost is too small"):
        prune_ratio([0.0], 4, 0.2)
    assert math.isclose(prune_ratio([0.0], 4, 0.25), 1.0)
