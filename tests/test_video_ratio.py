"""RATIO for the video methods (issue #20): `ratio` maps to each method's own budget, the method reports the
layer-averaged fraction it removed (`stats.removed_fraction`), explicit budget parameters win (noted), ratio=None
keeps the old defaults; and `random_prune`, the random visual-token pruning baseline."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.video.focus.config import ratio_schedule, schedule_removed

VIDEO = ("framefusion", "focus", "cmc", "adaptiv")


def _removed(model, prompt, name, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with me.apply(model, name, **cfg) as h, torch.no_grad():
            model(**prompt)
            return h.stats


@pytest.mark.parametrize("name", VIDEO)
def test_ratio_075_is_reached_or_explained(ov, ov_prompt, name):
    st = _removed(ov, ov_prompt, name, ratio=0.75)
    assert st.requested_ratio == 0.75
    if st.ratio_note:  # AdapTiV on a 2x2-per-frame grid: row 0 / column 0 / first frame are never dropped
        assert "cannot be reached" in st.ratio_note and name == "adaptiv"
        assert st.removed_fraction < 0.75
    else:
        assert abs(st.removed_fraction - 0.75) <= 0.05, (name, st.removed_fraction)


@pytest.mark.parametrize("name", ("framefusion", "focus", "cmc"))
def test_ratio_05(ov, ov_prompt, name):
    st = _removed(ov, ov_prompt, name, ratio=0.5)
    assert abs(st.removed_fraction - 0.5) <= 0.05 and st.ratio_note is None


def test_adaptiv_reachable_ratio_is_exact(ov, ov_prompt):
    st = _removed(ov, ov_prompt, "adaptiv", ratio=0.1)
    n = st.num_visual[0]
    assert st.dropped[0] == round(0.1 * n) and st.ratio_note is None and st.calibrated_threshold is not None


@pytest.mark.parametrize("name,budget", [("framefusion", dict(cost=0.6)), ("focus", dict(alpha_list=(0.5, 0.25),
                                                                                           selected_layers=(0, 1))),
                                         ("cmc", dict(fc_threshold=0.4)), ("adaptiv", dict(threshold=0.6))])
def test_explicit_budget_wins_with_a_note(ov, ov_prompt, name, budget):
    plain = _removed(ov, ov_prompt, name, **budget)
    both = _removed(ov, ov_prompt, name, ratio=0.75, **budget)
    assert both.removed_fraction == pytest.approx(plain.removed_fraction)
    assert "ignored" in both.ratio_note and plain.ratio_note is None


def test_ratio_none_keeps_the_defaults():
    get = lambda n: me.get_method(n).config_cls()  # noqa: E731
    assert get("framefusion").cost == 0.3
    assert get("focus").selected_layers == (2, 5, 8, 16, 25)
    assert get("focus").alpha_list == (0.4, 0.3, 0.2, 0.15, 0.1)
    assert get("cmc").fc_threshold == 0.4
    assert get("adaptiv").threshold == 0.6
    assert me.get_method("framefusion").config_cls(ratio=0.75).cost == pytest.approx(0.25)


@pytest.mark.parametrize("name", VIDEO + ("random_prune",))
@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, math.inf, "0.5", True])
def test_ratio_validation(name, bad):
    with pytest.raises(ConfigError, match=r"ratio must be"):
        me.get_method(name).config_cls(ratio=bad)


def test_focus_schedule_solves_the_ratio():
    for T, r in ((28, 0.5), (28, 0.75), (28, 0.9), (8, 0.75), (36, 0.6)):
        layers, alphas, note = ratio_schedule(r, T)
        assert note is None and max(layers) <= T - 2
        assert schedule_removed(layers, alphas, T) == pytest.approx(r, abs=1e-6)
        assert list(alphas) == sorted(alphas, reverse=True)
    with pytest.warns(UserWarning, match="cannot be reached"):
        _, _, note = ratio_schedule(0.9, 4)
    assert "at most 0.750" in note


def test_random_prune_is_fastv_random(ov, ov_prompt):
    with me.apply(ov, "random_prune", ratio=0.75, k=1, seed=3) as h, torch.no_grad():
        a = ov(**ov_prompt).logits
        keep = list(h.stats.keep_count)
    with me.apply(ov, "fastv", ratio=0.75, k=1, seed=3, scorer="random") as h, torch.no_grad():
        b = ov(**ov_prompt).logits
        assert list(h.stats.keep_count) == keep
    assert torch.equal(a, b)
    assert me.get_method("random_prune").family == "pruning" and me.get_method("random").family == "kv"


def test_plugin_rows_carry_ratio_and_removed_fraction(ov, ov_prompt):
    from mllm_efficiency.eval.plugin import MLLMEfficiency

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        h = me.apply(ov, "framefusion", ratio=0.75)
    try:
        with torch.no_grad():
            ov(**ov_prompt)
        fake = MLLMEfficiency.__new__(MLLMEfficiency)
        fake.handles = [h]
        fields = fake._ratio_fields(0)
        assert fields["requested_ratio"] == 0.75 and abs(fields["removed_fraction"] - 0.75) <= 0.05
    finally:
        h.remove()
