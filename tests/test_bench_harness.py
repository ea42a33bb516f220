"""`mllm-eff bench` harness on tiny random models (CPU): entry parsing, FLOPs model, one measured run."""
from __future__ import annotations

import json

import pytest
import torch

from mllm_efficiency import flops as F
from mllm_efficiency.bench.flops_model import decode_step_flops, prefill_flops
from mllm_efficiency.bench.harness import BenchSettings, run_bench
from mllm_efficiency.bench.report import summary_rows
from mllm_efficiency.bench.prompts import PromptShape, build_prompt
from mllm_efficiency.bench.roofline import kv_bytes, roofline_ms, stored_lengths
from mllm_efficiency.bench.specs import parse_entries, parse_entry
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.testing import tiny_llama_lm


# ------------------------------------------------------------------------------------------------ entries
def test_parse_entries_chain_and_values():
    e = parse_entry("fastv:k=2,ratio=0.75+snapkv:ratio=0.5,window=4")
    assert [m.name for m in e.methods] == ["fastv", "snapkv"]
    assert e.methods[0].params == {"k": 2, "ratio": 0.75}
    assert isinstance(e.methods[0].params["k"], int)
    assert e.label == "fastv:k=2,ratio=0.75+snapkv:ratio=0.5,window=4"
    assert parse_entry("vanilla").is_vanilla
    assert parse_entry("l2norm:ratio=0.5,skip_layers=0/1").methods[0].params["skip_layers"] == (0, 1)


@pytest.mark.parametrize("text,needle", [
    ("fastv:k=2,ratio=1.5", "ratio"),                 # out of range: names the field and the range
    ("nosuch:ratio=0.5", "available"),                # unknown method: lists the registry
    ("fastv:k", "key=value"),                         # malformed parameter
    ("fastv:bogus=1", "bogus"),                       # unknown field
    ("fastv+", "empty"),
    ("snapkv:ratio=0.5+snapkv:ratio=0.1", "twice"),
    ("vanilla+snapkv:ratio=0.5", "vanilla"),
    ("fastv:k=1,k=2", "twice"),
])
def test_parse_entry_errors_are_clear(text, needle):
    with pytest.raises(ConfigError) as err:
        parse_entry(text)
    assert needle in str(err.value) and text in str(err.value)


def test_duplicate_entries_rejected():
    with pytest.raises(ConfigError, match="repeat"):
        parse_entries(["vanilla", "none"])


def test_prompt_shape_validation():
    with pytest.raises(ConfigError, match="tokens_per_image"):
        PromptShape(images=1, tokens_per_image=10)
    with pytest.raises(ConfigError, match="batch"):
        PromptShape(batch=0)


def test_images_on_text_model_rejected():
    with pytest.raises(ConfigError, match="vision-language"):
        build_prompt(tiny_llama_lm(), PromptShape(images=1), "cpu", torch.float32)


# ------------------------------------------------------------------------------------------------ FLOPs model
SHAPE = F.LayerShape(hidden=64, intermediate=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, vocab=256)


def test_prefill_flops_matches_flops_module():
    assert prefill_flops(SHAPE, [100] * 4) == pytest.approx(F.exact_prefill_flops(SHAPE, 100))
    assert prefill_flops(SHAPE, [100, 100, 60, 60]) == pytest.approx(F.exact_prefill_flops(SHAPE, 100, 2, 60))
    assert prefill_flops(SHAPE, [100] * 4, batch=3) == pytest.approx(3 * F.exact_prefill_flops(SHAPE, 100))


def test_decode_step_flops_reference():
    d, qw, kvw, m = 64, 64, 32, 128
    per_layer = [2 * d * (2 * qw + 2 * kvw) + 2 * d * m * 3 + 4 * qw * n for n in (10, 20, 30, 40)]
    assert decode_step_flops(SHAPE, [10, 20, 30, 40]) == pytest.approx(sum(per_layer) + 2 * d * 256)


def test_flops_model_errors():
    with pytest.raises(ConfigError, match="one length per decoder layer"):
        prefill_flops(SHAPE, [10, 10])
    with pytest.raises(ConfigError, match=r"layer_lengths\[1\]"):
        prefill_flops(SHAPE, [10, -1, 10, 10])


def test_kv_bytes_of_a_cache():
    model = tiny_llama_lm()
    out = model(torch.randint(3, 100, (2, 12)), use_cache=True)
    cache = getattr(out, "cache", None) or out["past_key_values"]
    assert stored_lengths(cache) == [12] * 4
    assert kv_bytes(cache) == 4 * 2 * (2 * 2 * 12 * 16) * 4  # layers * (k, v) * (B*Hkv*S*D) * fp32


# ------------------------------------------------------------------------------------------------ one run
ENTRIES = ("vanilla", "fastv:k=2,ratio=0", "fastv:k=2,ratio=0.75", "snapkv:ratio=0.5,window=4")


@pytest.fixture(scope="module")
def llava_run():
    torch.set_num_threads(1)
    settings = BenchSettings(model="tiny-llava", entries=ENTRIES, shape=PromptShape(images=2, context=40),
                             decode="both", new_tokens=3, decode_warmup=1, warmup=0, repeats=1, keep_going=False)
    return run_bench(settings, progress=False)


def _entry(result, label):
    return next(r for r in result["entries"] if r["entry"] == label)


def test_run_prompt_and_fields(llava_run):
    p = llava_run["prompt"]
    assert p["visual_tokens"] == 32 and p["length"] == 72
    for r in llava_run["entries"]:
        assert "error" not in r, r.get("error")
        for key in ("vision", "ttft", "llm_prefill_ms", "kv_bytes", "prefill_flops", "decode_hf", "decode_fast"):
            assert key in r
        assert r["decode_hf"]["step"]["median_ms"] > 0 and r["decode_hf"]["tokens"].shape == (1, 5)


def test_ratio_zero_equals_vanilla(llava_run):
    van, zero = _entry(llava_run, "vanilla"), _entry(llava_run, "fastv:k=2,ratio=0")
    assert zero["processed_lengths"] == van["processed_lengths"] == [72] * 4
    assert zero["stored_lengths"] == van["stored_lengths"]
    assert zero["first_logits_max_diff"] == 0.0
    assert zero["flops_ratio"] == 1.0 and zero["kv_reduction"] == 0.0
    assert zero["decode_hf"]["tokens_equal_vanilla"] and zero["decode_fast"]["tokens_equal_vanilla"]


def test_fastv_lengths_and_flops_ratio(llava_run):
    r = _entry(llava_run, "fastv:k=2,ratio=0.75")
    keep = F.keep_count(32, 0.75)
    assert r["processed_lengths"] == [72, 72, 72 - 32 + keep, 72 - 32 + keep]
    assert r["stats"]["fastv"]["keep_count"] == [keep]
    shape = F.LayerShape.from_config(_tiny_llava_config())
    ref = F.fastv_flops(shape, 20, 32, 20, 2, 0.75)  # 40 text tokens: 20 before the images, 20 after
    assert r["flops_ratio"] == pytest.approx(1 / ref.exact_ratio)


def _tiny_llava_config():
    from mllm_efficiency.bench.presets import PRESETS

    return dict(PRESETS["tiny-llava"].text, model_type="llama")


def test_snapkv_kv_bytes_and_roofline(llava_run):
    van, r = _entry(llava_run, "vanilla"), _entry(llava_run, "snapkv:ratio=0.5,window=4")
    assert r["processed_lengths"] == van["processed_lengths"]
    assert r["flops_ratio"] == 1.0
    per_token = 2 * 2 * 16 * 4  # (k, v) * kv heads * head_dim * fp32, per layer
    assert r["kv_bytes"] == sum(r["stored_lengths"]) * per_token
    assert max(r["stored_lengths"]) < 72 and r["kv_reduction"] > 0.4
    d = r["decode_hf"]
    bw = llava_run["bandwidth"]["bytes_per_s"]
    assert d["roofline_ms"] == pytest.approx(roofline_ms(llava_run["model"]["decode_weight_bytes_read"],
                                                         d["kv_bytes_mid"], bw))
    assert d["kv_bytes_mid"] > r["kv_bytes"]  # the cache grew during decoding


def test_fast_and_hf_decode_agree(llava_run):
    for r in llava_run["entries"]:
        assert torch.equal(r["decode_hf"]["tokens"], r["decode_fast"]["tokens"]), r["entry"]
        assert r["fast_over_hf_speedup"] > 0


def test_summary_rows(llava_run):
    rows = summary_rows(llava_run)
    assert [r["entry"] for r in rows] == list(ENTRIES)
    assert all(r["hf_tok_s"] > 0 and r["fast_tok_s"] > 0 for r in rows)


def test_failing_entry_is_recorded_not_fatal():
    # FastV on a text-only model raises (no visual tokens); the vanilla entry still gets measured
    settings = BenchSettings(model="tiny-llama", entries=("vanilla", "fastv:k=1,ratio=0.5"),
                             shape=PromptShape(context=24), decode="none", warmup=0, repeats=1)
    result = run_bench(settings, progress=False)
    van, bad = result["entries"]
    assert "error" not in van and van["ttft"]["median_ms"] > 0
    assert "error" in bad and "NoVisualTokens" in bad["error"]
    json.dumps(__import__("mllm_efficiency.bench.report", fromlist=["jsonable"]).jsonable(result))
