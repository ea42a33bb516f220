"""Public API of FastV: registry, config validation and error messages, the handle, the seeds' front door."""
from __future__ import annotations

import pytest
import torch

import mllm_efficiency as me
from conftest import NUM_LAYERS, apply_quiet, greedy, keep_rule, text_impl
from mllm_efficiency.testing import tiny_llava


def test_available_methods_lists_fastv():
    assert "fastv" in me.available_methods()
    assert "fastv" in me.available_methods("pruning")
    assert me.available_methods("no-such-family") == []


def test_error_hierarchy():
    assert issubclass(me.ConfigError, ValueError)
    assert issubclass(me.NoVisualTokensError, ValueError)
    assert issubclass(me.UnsupportedModelError, TypeError)


def test_unknown_method_name(llava):
    with pytest.raises(me.ConfigError, match="fastvv") as exc:
        me.apply(llava, "fastvv", k=2)
    assert "fastv" in str(exc.value).replace("fastvv", "")  # lists the available methods
    assert text_impl(llava) == "sdpa"


def test_method_name_is_case_insensitive(llava):
    with me.apply(llava, "FastV", k=2, ratio=0.5) as h:
        assert h.name == "fastv"


def test_unknown_parameter_name(llava):
    with pytest.raises(me.ConfigError, match="fastv_r"):
        me.apply(llava, "fastv", k=2, fastv_r=0.5)
    with pytest.raises(me.ConfigError, match="rank"):
        me.apply(llava, "fastv", rank=3)
    assert text_impl(llava) == "sdpa"


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5", True, None])
def test_ratio_outside_range(llava, ratio):
    with pytest.raises(me.ConfigError, match="ratio") as exc:
        me.apply(llava, "fastv", k=2, ratio=ratio)
    if not isinstance(ratio, (str, bool, type(None))):
        assert "[0, 1)" in str(exc.value)
    assert text_impl(llava) == "sdpa"


@pytest.mark.parametrize("k", [NUM_LAYERS, NUM_LAYERS + 3, -1, 1.5])
def test_k_out_of_range(llava, k):
    with pytest.raises(me.ConfigError, match=r"\bk\b") as exc:
        me.apply(llava, "fastv", k=k, ratio=0.5)
    if k == NUM_LAYERS:
        assert str(NUM_LAYERS - 1) in str(exc.value)  # names the allowed maximum for this model
    assert text_impl(llava) == "sdpa"  # nothing left attached
    assert not hasattr(llava.model.language_model, "_mllm_eff_pruning_engine")


def test_k_last_layer_allowed(llava, prompt1):
    with apply_quiet(llava, k=NUM_LAYERS - 1, ratio=0.5) as h:
        llava(**prompt1)
        assert h.stats.scoring_layer == NUM_LAYERS - 2


@pytest.mark.parametrize("scorer", ["last_row", "all_rows", "text_rows"])
def test_k0_requires_random_scorer(llava, scorer):
    with pytest.raises(me.ConfigError, match="scorer") as exc:
        me.apply(llava, "fastv", k=0, ratio=0.5, scorer=scorer)
    assert "k=0" in str(exc.value)


@pytest.mark.parametrize("name,value", [
    ("mode", "fast"), ("scorer", "first_row"), ("grouping", "per_image"), ("positions", "shifted"),
    ("head_reduce", "min"), ("row_reduce", "median"), ("rerank", "per_layer"), ("seed", 1.5),
])
def test_bad_choice_names_parameter(llava, name, value):
    with pytest.raises(me.ConfigError, match=name):
        me.apply(llava, "fastv", k=2, ratio=0.5, **{name: value})


def test_renumber_needs_inplace(llava):
    with pytest.raises(me.ConfigError, match="positions"):
        me.apply(llava, "fastv", k=2, ratio=0.5, positions="renumber", mode="mask")


def test_span_fields_given_together(llava):
    with pytest.raises(me.ConfigError, match="image_token_length"):
        me.apply(llava, "fastv", k=2, ratio=0.5, image_token_start_index=3)
    with pytest.raises(me.ConfigError, match="image_token_start_index"):
        me.apply(llava, "fastv", k=2, ratio=0.5, image_token_length=16)
    with pytest.raises(me.ConfigError, match="image_token_length"):
        me.apply(llava, "fastv", k=2, ratio=0.5, image_token_start_index=3, image_token_length=0)


def test_unsupported_model_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    with pytest.raises(me.UnsupportedModelError, match="GPT2LMHeadModel"):
        me.apply(gpt2, "fastv", k=1, ratio=0.5)


def test_no_visual_tokens(llava, attach):
    attach(llava, k=2, ratio=0.5)
    with pytest.raises(me.NoVisualTokensError, match="allow_text_only"):
        llava(input_ids=torch.tensor([[1, 5, 6, 7, 8]]))


def test_defaults_and_config(llava):
    with me.apply(llava, "fastv") as h:
        assert (h.config.k, h.config.ratio, h.config.mode, h.config.scorer) == (2, 0.5, "inplace", "last_row")
        assert (h.config.grouping, h.config.positions, h.config.seed) == ("global", "original", 0)
        assert "fastv" in repr(h) and "active" in repr(h)
        with pytest.raises(Exception):
            h.config.k = 3  # frozen
    assert "removed" in repr(h)


def test_fastv_config_exported():
    cfg = me.FastVConfig(k=3, ratio=0.25)
    assert cfg.as_dict()["k"] == 3
    with pytest.raises(me.ConfigError, match="ratio"):
        me.FastVConfig(ratio=2.0)


def test_stats_fields(llava, prompt1):
    with me.apply(llava, "fastv", k=2, ratio=0.75) as h:
        llava(**prompt1, use_cache=True)
        st = h.stats
    assert st.num_visual == [16] and st.keep_count == [keep_rule(16, 0.75)]
    assert isinstance(st.kept_visual_positions, list) and st.kept_visual_positions[0].dim() == 1
    assert st.pruned_length == [10] and st.sequence_length == 22
    assert st.cache_lengths == [22, 22, 10, 10] and st.prefills == 1 and st.scoring_layer == 1


# ------------------------------------------------------------------------------------------ seed front door
@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    tiny_llava(num_layers=NUM_LAYERS).save_pretrained(path)
    return path


SEED_CFG = {"use_fastv": True, "fastv_k": 2, "fastv_r": 0.75, "image_token_start_index": 3,
            "image_token_length": 16}


def test_seed_from_pretrained_generates(saved_llava, prompt1):
    """The llava-hf front door attaches the same FastV as me.apply(k=2, ratio=0.75); generate runs with and
    without a cache (last_row: the two coincide on the first token only, see test_fastv.py)."""
    from mllm_efficiency import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(saved_llava, fastv_config=dict(SEED_CFG)).eval()
    h = model.fastv_handle
    assert h is not None and h.active
    assert (h.config.k, h.config.ratio, h.config.mode) == (2, 0.75, "inplace")
    assert model.config.text_config._attn_implementation.startswith("mllm_eff_")
    base_logits_with = model(**prompt1).logits
    with_cache = greedy(model, 5, **prompt1)
    assert h.stats.keep_count == [4] and h.stats.cache_lengths == [22, 22, 10, 10]
    no_cache = greedy(model, 5, **prompt1, use_cache=False)
    assert with_cache[0, 0] == no_cache[0, 0]
    # removing through the front door restores the stock model
    model.set_fastv_config({"use_fastv": False})
    assert model.fastv_handle is None and not h.active
    assert model.config.text_config._attn_implementation == "sdpa"
    assert not torch.equal(model(**prompt1).logits, base_logits_with)
    # the same settings through me.apply give the same tokens
    with me.apply(model, "fastv", k=2, ratio=0.75):
        assert torch.equal(model(**prompt1).logits, base_logits_with)
        assert torch.equal(greedy(model, 5, **prompt1), with_cache)
        assert torch.equal(greedy(model, 5, **prompt1, use_cache=False), no_cache)


def test_seed_from_pretrained_loads_all_weights(saved_llava, llava):
    """Regression: a front door defined outside `transformers.` must not lose transformers' checkpoint key
    conversions (the saved key language_model.lm_head.weight -> lm_head.weight); an earlier subclass-based
    version left lm_head randomly initialised."""
    from mllm_efficiency import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(saved_llava).eval()
    ref = llava.state_dict()  # same seed -> the weights that were saved
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_stock_from_pretrained_loads_all_weights(saved_llava, llava):
    """Control for the test above: the stock transformers class restores every weight."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(saved_llava).eval()
    ref = llava.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref[name]), name


def test_seed_from_pretrained_wrong_start_index(saved_llava, prompt1):
    from mllm_efficiency import LlavaForConditionalGeneration

    cfg = dict(SEED_CFG, image_token_start_index=5)
    model = LlavaForConditionalGeneration.from_pretrained(saved_llava, fastv_config=cfg).eval()
    with pytest.raises(me.ConfigError, match="image_token_start_index"):
        model(**prompt1)
    with pytest.raises(me.ConfigError, match="image_token_start_index"):
        greedy(model, 2, **prompt1)
    model.set_fastv_config(None)  # the attention registry entry stays while a model uses it


def test_seed_original_keys(saved_llava):
    """Original FastV keys: fast_v_attention_rank is the number KEPT, so R = 1 - rank / N."""
    from mllm_efficiency import LlavaForConditionalGeneration

    with pytest.warns(UserWarning, match="speedup"):
        model = LlavaForConditionalGeneration.from_pretrained(saved_llava, fastv_config={
            "use_fast_v": True, "fast_v_agg_layer": 3, "fast_v_inplace": False, "fast_v_sys_length": 3,
            "fast_v_image_token_length": 16, "fast_v_attention_rank": 4})
    cfg = model.fastv_handle.config
    assert (cfg.k, cfg.mode, cfg.ratio) == (3, "mask", 0.75)
    model.set_fastv_config(None)


def test_seed_unknown_key_and_disabled(saved_llava):
    from mllm_efficiency import LlavaForConditionalGeneration

    with pytest.raises(me.ConfigError, match="fastv_q"):
        LlavaForConditionalGeneration.from_pretrained(saved_llava, fastv_config={"use_fastv": True, "fastv_q": 1})
    model = LlavaForConditionalGeneration.from_pretrained(saved_llava, fastv_config={"use_fastv": False})
    assert model.fastv_handle is None
    model = LlavaForConditionalGeneration.from_pretrained(saved_llava)
    assert model.fastv_handle is None
