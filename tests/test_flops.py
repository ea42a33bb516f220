"""FLOPs accounting (docs/token_pruning.md): paper Eq. 5 reproduction, exact prefill count, equivalent tokens."""
import dataclasses
import math

import pytest

from mllm_efficiency.errors import ConfigError
from mllm_efficiency.flops import (
    FlopsReport,
    LayerShape,
    exact_layer_flops,
    fastv_flops,
    fastv_table,
    keep_count,
    paper_eq5,
    paper_eq5_layer_flops,
)

# LLaVA-1.5 language models (Vicuna): MHA, SwiGLU
LLAVA7B = LayerShape(hidden=4096, intermediate=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
LLAVA13B = LayerShape(hidden=5120, intermediate=13824, num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128)
N_PAPER = 612  # 36 prefix + 576 image tokens
N_IMG = 576


def _paper_gflops(t, k, r, d, m):
    """Paper reconstruction: n_hat = n - R*576 (fractional), per-layer average in 1e9."""
    return paper_eq5(t, k, N_PAPER, N_PAPER - r * N_IMG, d, m)["pruned"] / 1e9


# ---------------------------------------------------------------------------------------- paper Eq. 5
def test_eq5_layer_formula_by_hand():
    # 4*n*d^2 + 2*n^2*d + 2*n*d*m with n=3, d=5, m=7
    assert paper_eq5_layer_flops(3, 5, 7) == 4 * 3 * 25 + 2 * 9 * 5 + 2 * 3 * 5 * 7 == 600


@pytest.mark.parametrize(
    "k,r,paper",
    [(2, 0.90, 29.7), (2, 0.75, 50.2), (2, 0.50, 84.6), (3, 0.50, 86.4), (5, 0.50, 90.1)],
)
def test_paper_13b_flops_column(k, r, paper):
    got = _paper_gflops(40, k, r, 5120, 13824)
    assert round(got, 1) == paper
    assert abs(got - paper) < 0.05


def test_paper_baselines():
    b13 = paper_eq5(40, 2, N_PAPER, N_PAPER, 5120, 13824)
    assert round(b13["baseline"] / 1e9, 1) == 154.6
    assert b13["pruned"] == b13["baseline"] and b13["ratio"] == 1.0 and b13["reduction"] == 0.0
    b7 = paper_eq5(32, 2, N_PAPER, N_PAPER, 4096, 11008)
    assert round(b7["baseline"] / 1e9, 1) == 99.3
    assert round(b7["baseline"] / 1e9, 2) == 99.33


@pytest.mark.parametrize(
    "k,expected",
    [
        (2, (20.08, 33.00, 54.79)),
        (3, (22.72, 35.21, 56.27)),
        (5, (28.00, 39.63, 59.24)),
        (0, (14.79, 28.58, 51.82)),
    ],
)
def test_paper_7b_formula_column(k, expected):
    got = tuple(round(_paper_gflops(32, k, r, 4096, 11008), 2) for r in (0.90, 0.75, 0.50))
    assert got == expected


def test_paper_eq5_dict_consistency():
    out = paper_eq5(32, 2, 612, 612 - 0.75 * 576, 4096, 11008)
    assert set(out) >= {"baseline", "pruned", "ratio", "reduction"}
    assert out["ratio"] == pytest.approx(out["pruned"] / out["baseline"])
    assert out["reduction"] == pytest.approx(1 - out["ratio"])
    # paper's "ratio" column for 7B K2 R75 is 33%
    assert round(out["ratio"] * 100) == 33


def test_fastv_flops_paper_fields_match_reconstruction():
    # integer keep: R=0.5 -> 288, R=0.75 -> 144 coincide with R*576 exactly
    for r, cell in ((0.5, 84.60), (0.75, 50.18)):
        rep = fastv_flops(LLAVA13B, 36, 576, 0, 2, r)
        assert rep.paper_eq5_n == 612 and rep.paper_eq5_n_hat == 612 - int(r * 576)
        assert round(rep.paper_eq5_baseline / 1e9, 2) == 154.64
        assert round(rep.paper_eq5_pruned / 1e9, 2) == cell
        assert rep.paper_eq5_ratio == pytest.approx(rep.paper_eq5_pruned / rep.paper_eq5_baseline)
    # text after the image is ignored by Eq. 5 but counted by the exact number
    a = fastv_flops(LLAVA7B, 36, 576, 0, 2, 0.5)
    b = fastv_flops(LLAVA7B, 36, 576, 50, 2, 0.5)
    assert a.paper_eq5_pruned == b.paper_eq5_pruned and a.paper_eq5_baseline == b.paper_eq5_baseline
    assert b.exact_prefill_flops_baseline > a.exact_prefill_flops_baseline
    # R=0.9: integer keep 58 (not 57.6) -> n_hat 94
    c = fastv_flops(LLAVA7B, 36, 576, 0, 2, 0.9)
    assert c.keep == 58 and c.paper_eq5_n_hat == 94


# ---------------------------------------------------------------------------------------- keep rule
@pytest.mark.parametrize(
    "n,r,keep",
    [(576, 0.25, 432), (576, 0.5, 288), (576, 0.75, 144), (576, 0.9, 58), (576, 0.0, 576),
     (1, 0.9, 1), (5, 0.5, 2), (7, 0.5, 4), (3, 0.999, 1), (0, 0.5, 0)],
)
def test_keep_rule(n, r, keep):
    # 5*0.5 = 2.5 -> 2 and 7*0.5 = 3.5 -> 4 (Python round, ties to even); lower clamp to 1
    assert keep_count(n, r) == keep
    if n > 0:
        assert fastv_flops(LLAVA7B, 1, n, 0, 2, r).keep == keep


def test_explicit_keep_overrides_rule():
    rep = fastv_flops(LLAVA7B, 36, 576, 0, 2, 0.5, keep=100)
    assert rep.keep == 100 and rep.n_pruned == 36 + 100


# ---------------------------------------------------------------------------------------- invariants
def test_ratio_zero_is_identity():
    rep = fastv_flops(LLAVA7B, 36, 576, 20, 2, 0.0)
    assert rep.keep == 576
    assert rep.exact_ratio == 1.0 and rep.paper_eq5_ratio == 1.0
    assert rep.exact_prefill_flops_pruned == rep.exact_prefill_flops_baseline
    assert rep.equivalent_tokens == 576


def test_monotone_decreasing_in_ratio():
    ratios = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99]
    reps = [fastv_flops(LLAVA7B, 36, 576, 40, 2, r) for r in ratios]
    for a, b in zip(reps, reps[1:]):
        assert b.exact_ratio < a.exact_ratio
        assert b.paper_eq5_ratio < a.paper_eq5_ratio
        assert b.equivalent_tokens < a.equivalent_tokens
        # baseline never depends on ratio
        assert b.exact_prefill_flops_baseline == a.exact_prefill_flops_baseline


def test_later_k_saves_less():
    ks = [0, 1, 2, 5, 16, 31]
    reps = [fastv_flops(LLAVA7B, 36, 576, 40, k, 0.5) for k in ks]
    for a, b in zip(reps, reps[1:]):
        assert b.exact_ratio > a.exact_ratio


def test_last_layer_prunes_only_one_layer():
    t = LLAVA7B.num_layers
    rep = fastv_flops(LLAVA7B, 36, 576, 40, t - 1, 0.75)
    full = exact_layer_flops(LLAVA7B, 36 + 576 + 40)
    small = exact_layer_flops(LLAVA7B, 36 + 144 + 40)
    assert rep.exact_prefill_flops_baseline - rep.exact_prefill_flops_pruned == pytest.approx(full - small)
    assert rep.equivalent_tokens == pytest.approx(((t - 1) * 576 + 144) / t)
    f = paper_eq5_layer_flops(612, 4096, 11008)
    f_hat = paper_eq5_layer_flops(612 - 432, 4096, 11008)
    assert rep.paper_eq5_pruned == pytest.approx(((t - 1) * f + f_hat) / t)


def test_equivalent_tokens_sparsevlm_convention():
    rep = fastv_flops(LLAVA7B, 36, 576, 0, 2, 0.75)
    assert rep.keep == 144
    assert rep.equivalent_tokens == (2 * 576 + 30 * 144) / 32 == 171


def test_k0_prunes_every_layer():
    rep = fastv_flops(LLAVA7B, 36, 576, 0, 0, 0.5)
    assert rep.equivalent_tokens == 288
    assert rep.exact_prefill_flops_pruned == pytest.approx(32 * exact_layer_flops(LLAVA7B, 36 + 288))


# ---------------------------------------------------------------------------------------- exact count by hand
def test_exact_flops_tiny_gqa_by_hand():
    # d=8, m=16, T=4, 4 query heads, 2 KV heads, head_dim 2 -> q width 8, kv width 4; SwiGLU; vocab 10
    shape = LayerShape(hidden=8, intermediate=16, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=2,
                       vocab=10, gated_mlp=True)
    # prefix 3, visual 8, text 2 -> n = 13; K=1, R=0.5 -> keep round(4.0) = 4 -> pruned layers see 13 - 4 = 9

    def layer(n):
        q = 2 * n * 8 * 8  # d -> H*hd
        k = 2 * n * 8 * 4  # d -> Hkv*hd
        v = 2 * n * 8 * 4
        o = 2 * n * 8 * 8  # H*hd -> d
        qk = 2 * (4 * 2) * n * n / 2  # 2 * H * hd * n^2/2 (causal)
        av = 2 * (4 * 2) * n * n / 2
        mlp = 3 * 2 * n * 8 * 16  # gate, up, down
        return q + k + v + o + qk + av + mlp

    assert layer(13) == 1152 * 13 + 16 * 169 == 17680
    assert layer(9) == 1152 * 9 + 16 * 81 == 11664
    lm_head = 2 * 8 * 10  # last position only
    baseline = 4 * 17680 + lm_head  # 70880
    pruned = 1 * 17680 + 3 * 11664 + lm_head  # 52832

    rep = fastv_flops(shape, 3, 8, 2, 1, 0.5)
    assert isinstance(rep, FlopsReport)
    assert rep.keep == 4 and rep.n_total == 13 and rep.n_pruned == 9
    assert exact_layer_flops(shape, 13) == 17680
    assert rep.lm_head_flops == 160
    assert rep.exact_prefill_flops_baseline == 70880
    assert rep.exact_prefill_flops_pruned == 52832
    assert rep.exact_ratio == pytest.approx(52832 / 70880)
    assert rep.equivalent_tokens == (1 * 8 + 3 * 4) / 4 == 5

    # two-matrix FFN, no LM head: mlp 2*2*n*d*m = 512 n -> layer = 384 n + 16 n^2
    plain = LayerShape(hidden=8, intermediate=16, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=2,
                       vocab=0, gated_mlp=False)
    rep2 = fastv_flops(plain, 3, 8, 2, 1, 0.5)
    assert rep2.lm_head_flops == 0
    assert rep2.exact_prefill_flops_baseline == 4 * (896 * 13 + 16 * 169)
    assert rep2.exact_prefill_flops_pruned == (896 * 13 + 16 * 169) + 3 * (896 * 9 + 16 * 81)


def test_gqa_is_cheaper_than_mha():
    mha = LayerShape(4096, 11008, 32, 32, 32, 128)
    gqa = LayerShape(4096, 11008, 32, 32, 8, 128)
    n = 700
    # k and v projections shrink from 2*2*n*d*4096 to 2*2*n*d*1024
    assert exact_layer_flops(mha, n) - exact_layer_flops(gqa, n) == 2 * 2 * n * 4096 * (4096 - 1024)


# ---------------------------------------------------------------------------------------- report helpers
def test_as_dict_describe_and_table():
    rep = fastv_flops(LLAVA7B, 36, 576, 0, 2, 0.75)
    d = rep.as_dict()
    for key in ("paper_eq5_baseline", "paper_eq5_pruned", "paper_eq5_ratio", "exact_prefill_flops_baseline",
                "exact_prefill_flops_pruned", "exact_ratio", "equivalent_tokens", "keep", "num_visual"):
        assert key in d
    assert d["keep"] == 144 and d["equivalent_tokens"] == 171
    assert d["exact_reduction"] == pytest.approx(1 - rep.exact_ratio)
    text = rep.describe()
    assert "K=2" in text and "144/576" in text and "171" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        rep.keep = 3  # frozen

    rows = fastv_table(LLAVA13B, 36, 576, ks=[2, 3], ratios=[0.5, 0.75])
    assert [(r["k"], r["ratio"]) for r in rows] == [(2, 0.5), (2, 0.75), (3, 0.5), (3, 0.75)]
    assert round(rows[0]["paper_eq5_pruned_gflops"], 1) == 84.6
    assert round(rows[2]["paper_eq5_pruned_gflops"], 1) == 86.4
    assert round(rows[0]["paper_eq5_baseline_gflops"], 1) == 154.6
    assert all(r["text_len"] == 0 for r in rows)


# ---------------------------------------------------------------------------------------- from_config
def test_from_config_llama():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    s = LayerShape.from_config(cfg)
    assert s == LayerShape(hidden=64, intermediate=176, num_layers=3, num_heads=4, num_kv_heads=2,
                           head_dim=16, vocab=100, gated_mlp=True)


def test_from_config_llama_explicit_head_dim_and_mha_default():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      head_dim=32, vocab_size=50)
    s = LayerShape.from_config(cfg)
    assert s.head_dim == 32  # config.head_dim wins over hidden // heads = 16
    assert s.num_kv_heads == 4  # no num_key_value_heads given -> MHA


def test_from_config_qwen2():
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=96, intermediate_size=256, num_hidden_layers=5, num_attention_heads=6,
                      num_key_value_heads=2, vocab_size=321)
    s = LayerShape.from_config(cfg)
    assert (s.hidden, s.intermediate, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab) == (
        96, 256, 5, 6, 2, 16, 321)
    assert s.gated_mlp is True


def test_from_config_llava_uses_text_config():
    from transformers import LlavaConfig

    cfg = LlavaConfig(text_config=dict(model_type="llama", hidden_size=48, intermediate_size=100,
                                       num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
                                       vocab_size=77))
    s = LayerShape.from_config(cfg)
    assert s == LayerShape(hidden=48, intermediate=100, num_layers=4, num_heads=3, num_kv_heads=1,
                           head_dim=16, vocab=77, gated_mlp=True)

    class FakeModel:
        config = cfg

    assert LayerShape.from_model(FakeModel()) == s


def test_from_config_without_required_fields_raises():
    with pytest.raises(ValueError, match="hidden_size"):
        LayerShape.from_config({"num_hidden_layers": 2})


# ---------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio=float("nan")), "ratio"),
        (dict(k=32), "k"),
        (dict(k=-1), "k"),
        (dict(k=1.5), "k"),
        (dict(prefix_len=-1), "prefix_len"),
        (dict(num_visual=-5), "num_visual"),
        (dict(text_len=-2), "text_len"),
        (dict(keep=577), "keep"),
        (dict(keep=-1), "keep"),
        (dict(prefix_len=True), "prefix_len"),
    ],
)
def test_fastv_flops_bad_inputs(kwargs, param):
    args = dict(shape=LLAVA7B, prefix_len=36, num_visual=576, text_len=0, k=2, ratio=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"\b{param}\b") as info:
        fastv_flops(**args)
    assert isinstance(info.value, ConfigError)


def test_fastv_flops_empty_sequence_and_bad_shape():
    with pytest.raises(ValueError, match="prefix_len"):
        fastv_flops(LLAVA7B, 0, 0, 0, 2, 0.5)
    with pytest.raises(ValueError, match="shape"):
        fastv_flops({"hidden": 1}, 36, 576, 0, 2, 0.5)


@pytest.mark.parametrize(
    "args,param",
    [
        ((32, 32, 612, 300, 4096, 11008), "k"),
        ((0, 0, 612, 300, 4096, 11008), "num_layers"),
        ((32, 2, 612, 700, 4096, 11008), "n_hat"),
        ((32, 2, -1, 0, 4096, 11008), "n"),
        ((32, 2, 612, 300, 0, 11008), "d"),
        ((32, 2, 612, 300, 4096, -1), "m"),
    ],
)
def test_paper_eq5_bad_inputs(args, param):
    with pytest.raises(ValueError, match=rf"\b{param}\b"):
        paper_eq5(*args)


@pytest.mark.parametrize(
    "field,value",
    [("hidden", 0), ("num_layers", 0), ("num_heads", 0), ("num_kv_heads", 0), ("num_kv_heads", 64),
     ("head_dim", -1), ("vocab", -1), ("intermediate", -3)],
)
def test_layer_shape_validation(field, value):
    args = dict(hidden=4096, intermediate=11008, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128)
    args[field] = value
    with pytest.raises(ValueError, match=field):
        LayerShape(**args)


def test_keep_count_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        keep_count(576, 1.0)
    assert math.isclose(keep_count(576, 0.5), 288)
