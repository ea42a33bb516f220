"""Every ordered pair of registered methods (each method with itself included) on one tiny LLaVA-OneVision video
model: the pair either runs a forward and a 3-token generate, or the second `apply` is refused with a message
naming both methods and leaves the model exactly as it was (hooks, attributes, submodules, attention registry,
configs, logits). Plus the rules' known cases and the rollback of an attach that fails half-way."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import mllm_efficiency as me
from conftest import library_registrations, model_state
from mllm_efficiency.core import composition
from mllm_efficiency.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SETTINGS = {  # tiny-model settings; every other method runs with its defaults
    "focus": dict(selected_layers=(0, 1), alpha_list=(0.5, 0.25)),
    "qllm": dict(on_missing_question="infllm"),
}
VISION_SIDE = ("visionzip", "prumerge_plus")  # LLaVA-1.5-style models only: their pairs run on the tiny LLaVA below
METHODS = [m for m in me.available_methods() if m not in VISION_SIDE]
PAIRS = [(a, b) for a in METHODS for b in METHODS]
VISION_PAIRS = [(a, b) for a in VISION_SIDE for b in me.available_methods()] + \
    [(b, a) for a in VISION_SIDE for b in me.available_methods() if b not in VISION_SIDE]


def _apply(model, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return me.apply(model, name, **SETTINGS.get(name, {}))


@pytest.fixture(scope="module", autouse=True)
def _quiet_memory_warnings():
    logging.disable(logging.WARNING)  # qllm without a question says so on every prefill
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def plain(ov, ov_prompt):
    with torch.no_grad():
        logits = ov(**ov_prompt).logits
    return logits, model_state(ov)


def _logits(model, prompt):
    with torch.no_grad():
        return model(**prompt).logits


@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_pair_runs_or_is_refused_cleanly(ov, ov_prompt, plain, first, second):
    h1 = _apply(ov, first)
    try:
        before, logits_before = model_state(ov), _logits(ov, ov_prompt)
        try:
            h2 = _apply(ov, second)
        except ConfigError as err:
            assert first in str(err) and second in str(err), str(err)
            assert model_state(ov) == before
            assert torch.equal(_logits(ov, ov_prompt), logits_before)
            return
        try:
            with torch.no_grad():
                ov(**ov_prompt)
                out = ov.generate(**ov_prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            assert out.shape[1] == ov_prompt["input_ids"].shape[1] + 3
        finally:
            h2.remove()
    finally:
        h1.remove()
    assert model_state(ov) == plain[1]
    assert torch.equal(_logits(ov, ov_prompt), plain[0])


@pytest.fixture(scope="module")
def vl():
    from mllm_efficiency.testing import llava_prompt, tiny_llava

    model = tiny_llava(num_layers=4)
    ids, pv = llava_prompt(num_images=2, seed=1)
    prompt = dict(input_ids=ids, pixel_values=pv)
    return model, prompt, _logits(model, prompt), model_state(model)


@pytest.mark.parametrize("first,second", VISION_PAIRS, ids=[f"{a}+{b}" for a, b in VISION_PAIRS])
def test_vision_side_pair_runs_or_is_refused_cleanly(vl, first, second):
    model, prompt, logits, state = vl
    test_pair_runs_or_is_refused_cleanly(model, prompt, (logits, state), first, second)


@pytest.mark.parametrize("first,second", [("fastv", "fastv"), ("cmc", "cmc"), ("adaptiv", "adaptiv"),
                                          ("framefusion", "framefusion"), ("focus", "focus"), ("cmc", "focus"),
                                          ("focus", "cmc"), ("infllm", "fastv"), ("qllm", "snapkv"),
                                          ("streamingllm_memory", "focus"), ("snapkv", "h2o"), ("fastv", "qllm")])
def test_known_conflicts_are_refused_naming_both(ov, first, second):
    with _apply(ov, first):
        with pytest.raises(ConfigError, match=f"{second} does not compose with {first}"):
            _apply(ov, second)


@pytest.mark.parametrize("first,second", [
    (("simignore", dict(action="drop")), ("adaptiv", {})), (("adaptiv", {}), ("simignore", dict(action="drop"))),
    (("fastv", dict(k=0, scorer="random")), ("adaptiv", {})), (("adaptiv", {}), ("fastv", dict(k=0, scorer="random")))])
def test_settings_that_break_adaptiv_are_refused(ov, ov_prompt, first, second):
    """AdapTiV's layer-0 grid matching after tokens were removed before layer 0 crashed in the forward."""
    with me.apply(ov, first[0], **first[1]):
        with pytest.raises(ConfigError, match=f"{second[0]} does not compose with {first[0]}"):
            me.apply(ov, second[0], **second[1])
    with me.apply(ov, "simignore", action="mask"), me.apply(ov, "adaptiv"), me.apply(ov, "fastv", k=1):
        with torch.no_grad():
            ov.generate(**ov_prompt, max_new_tokens=2, do_sample=False)


def test_memory_then_pruning_leaves_nothing_and_the_model_stays_usable(ov, ov_prompt, plain):
    h = _apply(ov, "infllm")
    with pytest.raises(ConfigError, match="block memory"):
        _apply(ov, "fastv")
    h.remove()
    assert model_state(ov) == plain[1]
    with _apply(ov, "fastv"):  # used to be refused forever after the failed attempt
        assert composition.attached_methods(ov.model.language_model) == ["fastv"]
    assert torch.equal(_logits(ov, ov_prompt), plain[0])


def test_stacking_kinds_still_compose(ov, ov_prompt):
    for pair in [("simignore", "fastv"), ("fastv", "snapkv"), ("focus", "fastv"), ("adaptiv", "framefusion")]:
        with _apply(ov, pair[0]), _apply(ov, pair[1]):
            with torch.no_grad():
                ov.generate(**ov_prompt, max_new_tokens=2, do_sample=False)


def test_failed_attach_is_rolled_back(ov, ov_prompt, plain, monkeypatch):
    """CMC fails after its engine, layout hooks and some SIC wrappers are in place, on top of an attached
    SnapKV: everything CMC did is undone, SnapKV keeps working and detaches cleanly."""
    from mllm_efficiency.video import cmc

    calls = []

    class Failing(cmc.SICLinear):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("injected failure")
            super().__init__(*args, **kwargs)

    with _apply(ov, "snapkv") as kv:
        before = model_state(ov)
        ref = _logits(ov, ov_prompt)
        monkeypatch.setattr(cmc, "SICLinear", Failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            _apply(ov, "cmc")
        assert model_state(ov) == before
        assert torch.equal(_logits(ov, ov_prompt), ref)
        assert kv.stats.prefills >= 1
        assert composition.attached_methods(ov.model.language_model) == ["snapkv"]
    assert model_state(ov) == plain[1]


def test_registry_entries_go_with_the_last_user(ov, llama_text):
    start = library_registrations()
    with _apply(ov, "fastv"), _apply(llama_text, "snapkv"):
        assert "mllm_eff_sdpa" in library_registrations()
    with _apply(ov, "infllm"):
        assert "mllm_eff_block_memory" in library_registrations()
    assert library_registrations() == start - {"mllm_eff_sdpa", "mllm_eff_block_memory"}
    assert ov.model.language_model.config._attn_implementation == "sdpa"
