"""`mllm-eff report`: rows from lmms-eval result files + the plugin's efficiency summaries; a run repeated into the
same folder counts once (its newest result)."""
from __future__ import annotations

import json
from pathlib import Path

from mllm_efficiency.eval import report


def write_run(root: Path, method: str, ratio: float, stamp: str, score: float, prefill_ms: float) -> None:
    run = root / f"{method}_{ratio:g}"
    (run / "shapes-vlm").mkdir(parents=True, exist_ok=True)
    log = run / "efficiency.jsonl"
    (run / "efficiency.summary.json").write_text(json.dumps(
        {"mean_prefill_ms": prefill_ms, "mean_kept_tokens": 40.0, "mean_kv_bytes": 2048.0,
         "mean_prefill_tflops": 0.01}))
    args = f"pretrained=shapes-vlm,method={method},ratio={ratio},efficiency_log={log}"
    (run / "shapes-vlm" / f"{stamp}_results.json").write_text(json.dumps(
        {"results": {"shapes_vqa": {"alias": "shapes_vqa", "exact_match,none": score,
                                    "exact_match_stderr,none": 0.03}},
         "config": {"model_args": args}, "n-samples": {"shapes_vqa": {"effective": 200}}}))


def test_report_keeps_the_newest_result_of_each_run(tmp_path):
    write_run(tmp_path, "vanilla", 0, "20261130_101010", 0.68, 400.0)
    write_run(tmp_path, "vanilla", 0, "20261201_101010", 0.785, 460.0)
    write_run(tmp_path, "fastv", 0.75, "20261201_111111", 0.595, 130.0)
    rows = report.collect(tmp_path)
    assert [(r["method"], r["ratio"], r["score"]) for r in rows] == [("fastv", 0.75, 0.595), ("vanilla", 0.0, 0.785)]
    vanilla = rows[1]
    assert vanilla["prefill_ms"] == 460.0 and vanilla["n"] == 200 and vanilla["kv_kib"] == 2.0
    assert vanilla["source"].endswith("20261201_101010_results.json")
    text = report.table(rows)
    assert "0.785" in text and "0.680" not in text


def test_report_ignores_files_that_are_not_lmms_eval_results(tmp_path):
    write_run(tmp_path, "fastv", 0.5, "20261201_111111", 0.7, 150.0)
    (tmp_path / "other_results.json").write_text("[1, 2]")
    (tmp_path / "broken_results.json").write_text("{not json")
    assert [r["score"] for r in report.collect(tmp_path)] == [0.7]


def test_build_report_writes_table_and_json(tmp_path):
    write_run(tmp_path / "res", "vanilla", 0, "20261201_101010", 0.785, 460.0)
    write_run(tmp_path / "res", "fastv", 0.75, "20261201_111111", 0.595, 130.0)
    text = report.build_report(tmp_path / "res", tmp_path / "out")
    assert "| shapes_vqa |" in text
    assert json.loads((tmp_path / "out" / "report.json").read_text())[0]["method"] == "fastv"
    assert (tmp_path / "out" / "report.md").read_text().count("| shapes_vqa |") == 2


def test_build_report_errors_name_the_directory(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="is not a directory"):
        report.build_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no lmms-eval results"):
        report.build_report(tmp_path)
