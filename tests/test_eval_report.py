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
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert sum(ln.startswith("| shapes_vqa |") for ln in md) == 2  # the run table's rows
    assert any(ln.startswith("| method | ratio | shapes_vqa |") for ln in md)  # the method x ratio x task grid


def test_build_report_errors_name_the_directory(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="is not a directory"):
        report.build_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no usable lmms-eval results"):
        report.build_report(tmp_path)


# ------------------------------------------------------------------------------- bad runs, paths, plots, overwrite
def _results_file(root: Path, name: str, payload) -> Path:
    path = root / "bad" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_report_skips_and_lists_bad_runs(tmp_path):
    write_run(tmp_path, "fastv", 0.5, "20261201_111111", 0.7, 150.0)
    write_run(tmp_path, "vanilla", 0, "20261201_101010", 0.8, 300.0)
    (tmp_path / "vanilla_0" / "efficiency.summary.json").write_text("{truncated")
    results = {"shapes_vqa": {"exact_match,none": 0.5}}
    _results_file(tmp_path, "a_results.json", {"results": results, "config": None})
    _results_file(tmp_path, "b_results.json", {"results": results,
                                               "config": {"model_args": "pretrained=x,method=fastv,ratio=abc"}})
    _results_file(tmp_path, "c_results.json", "{not json")
    got = report.collect_runs(tmp_path)
    assert [(r["method"], r["score"]) for r in got.rows] == [("fastv", 0.7), ("vanilla", 0.8)]
    assert got.rows[1]["prefill_ms"] is None and got.rows[0]["prefill_ms"] == 150.0
    problems = "\n".join(got.problems)
    assert len(got.problems) == 4, problems
    for needle in ("a_results.json", "ratio='abc'", "c_results.json", "efficiency.summary.json"):
        assert needle in problems
    text = report.build_report(tmp_path, tmp_path / "out", with_plots=False)
    assert "skipped or incomplete runs (4)" in text and "ratio='abc'" in text
    assert "ratio='abc'" in (tmp_path / "out" / "report.md").read_text()


def test_report_resolves_relative_efficiency_log_against_results_dir(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    res = root / "results" / "shapes_vqa" / "shapes-vlm"
    write_run(res, "fastv", 0.75, "20261201_111111", 0.6, 130.0)
    result = next(res.rglob("*_results.json"))
    data = json.loads(result.read_text())  # what run_eval writes: relative to the directory it ran in
    data["config"]["model_args"] = ("pretrained=shapes-vlm,method=fastv,ratio=0.75,"
                                    "efficiency_log=results/shapes_vqa/shapes-vlm/fastv_0.75/efficiency.jsonl")
    result.write_text(json.dumps(data))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert report.collect(res)[0]["prefill_ms"] == 130.0
    monkeypatch.chdir(tmp_path)
    assert report.collect(Path("repo/results"))[0]["prefill_ms"] == 130.0


def test_report_refuses_to_overwrite_without_force(tmp_path, capsys):
    from mllm_efficiency.eval import cli as eval_cli

    write_run(tmp_path, "fastv", 0.5, "20261201_111111", 0.7, 150.0)
    (tmp_path / "report.md").write_text("my notes")
    assert eval_cli.main(["report", str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "report.md exists" in err and "--force" in err
    assert (tmp_path / "report.md").read_text() == "my notes"
    assert eval_cli.main(["report", str(tmp_path), "--no-plots", "--force"]) == 0
    assert "replaced the existing one" in capsys.readouterr().out
    assert "| shapes_vqa |" in (tmp_path / "report.md").read_text()


def test_report_says_when_plots_cannot_be_drawn(tmp_path, monkeypatch):
    import sys

    write_run(tmp_path, "fastv", 0.5, "20261201_111111", 0.7, 150.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = report.build_report(tmp_path)
    assert "plots not drawn: matplotlib is not installed" in text and ".[eval]" in text
    assert not list(tmp_path.glob("*.png"))


def test_report_draws_plots(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    write_run(tmp_path, "vanilla", 0, "20261201_101010", 0.8, 300.0)
    write_run(tmp_path, "fastv", 0.5, "20261201_111111", 0.7, 150.0)
    text = report.build_report(tmp_path)
    pngs = sorted(tmp_path.glob("report_*.png"))
    names = {p.name for p in pngs}
    assert "report_shapes_vqa_shapes-vlm.png" in names and "report_heatmap_shapes-vlm.png" in names, names
    for png in pngs:  # the accuracy/efficiency plot, the frontier and the heat map
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in text


# ------------------------------------------------------------------------------------------------------ loyalty
def write_samples(root: Path, method: str, ratio: float, stamp: str, answers: list[str], targets: list[str],
                  task: str = "shapes_vqa") -> None:
    """lmms-eval's --log_samples file beside the run's results (exact_match per sample)."""
    path = root / f"{method}_{ratio:g}" / "shapes-vlm" / f"{stamp}_samples_{task}.jsonl"
    rows = [{"doc_id": i, "target": t, "filtered_resps": a, "exact_match": float(a == t)}
            for i, (a, t) in enumerate(zip(answers, targets))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_loyalty_against_vanilla_in_the_report(tmp_path):
    targets = ["red", "2", "yes", "no"]
    write_run(tmp_path, "vanilla", 0, "20261201_101010", 0.5, 300.0)
    write_samples(tmp_path, "vanilla", 0, "20261201_101010", ["red", "3", "yes", "yes"], targets)
    write_run(tmp_path, "fastv", 0.75, "20261201_111111", 0.5, 130.0)
    # doc 0 same answer; doc 1 other wrong answer (score equal, answer not); doc 2 wrong now; doc 3 right now
    write_samples(tmp_path, "fastv", 0.75, "20261201_111111", ["red", "4", "no", "no"], targets)
    rows = {r["method"]: r for r in report.collect(tmp_path)}
    assert rows["vanilla"]["loyalty"] == 1.0 and rows["vanilla"]["score_loyalty"] == 1.0
    assert rows["fastv"]["loyalty"] == 0.25 and rows["fastv"]["score_loyalty"] == 0.5
    assert rows["fastv"]["loyal_n"] == 4
    text = report.table(list(rows.values()))
    assert "loyalty" in text and "0.250" in text


def test_loyalty_is_empty_without_a_vanilla_run_or_samples(tmp_path):
    write_run(tmp_path, "fastv", 0.75, "20261201_111111", 0.5, 130.0)
    write_samples(tmp_path, "fastv", 0.75, "20261201_111111", ["red"], ["red"])
    write_run(tmp_path / "other", "vanilla", 0, "20261201_101010", 0.5, 300.0)  # no samples file
    for r in report.collect(tmp_path):
        assert r["loyalty"] is None and r["score_loyalty"] is None


def test_sample_scores_of_lmms_eval_metric_shapes():
    pope = {"pope_accuracy": {"question_id": "1", "score": 1.0, "prediction": "yes", "ground_truth": "yes"}}
    assert report.sample_score(pope, ["pope_accuracy", "pope_f1_score"]) == 1.0
    mme = {"mme_cognition_score": {"question_id": "a.png", "category": "code_reasoning", "score": 0.0}}
    assert report.sample_score(mme, ["mme_perception_score", "mme_cognition_score"]) == 0.0
    mmmu = {"mmmu_acc": {"id": "validation_Math_1", "answer": "B", "parsed_pred": ["B"]}}
    assert report.sample_score(mmmu, ["mmmu_acc"]) == 1.0
    mmbench = {"gpt_eval_score": {"index": 0, "answer": "A", "prediction": "yes"}}
    assert report.sample_score(mmbench, ["gpt_eval_score"]) is None
    a = {0: {"doc_id": 0, "filtered_resps": ["yes"], **pope}}
    assert report.loyalty(a, a, ["pope_accuracy"]) == {"loyalty": 1.0, "score_loyalty": 1.0, "n": 1}


# ------------------------------------------------------------------------------- grid table, frontier, heat map
def _row(task, method, ratio, score, tflops, loyalty=None):
    return {"task": task, "model": "m", "method": method, "ratio": ratio, "kept": 1 - ratio, "metric": "acc",
            "score": score, "n": 10, "prefill_ms": None if tflops is None else tflops * 1000, "kept_tokens": None, "kv_kib": 1.0,
            "tflops": tflops, "loyalty": loyalty, "score_loyalty": loyalty}


def test_pareto_front_keeps_the_points_nothing_beats():
    pts = [_row("t", "vanilla", 0, 0.80, 1.0), _row("t", "fastv", 0.5, 0.78, 0.5), _row("t", "fastv", 0.75, 0.60, 0.3),
           _row("t", "random", 0.5, 0.70, 0.5), _row("t", "random", 0.75, 0.65, 0.35), _row("t", "x", 0.9, 0.2, None)]
    front = report.pareto_front(pts)
    assert [(p["method"], p["ratio"]) for p in front] == [("fastv", 0.75), ("random", 0.75), ("fastv", 0.5),
                                                          ("vanilla", 0)]
    assert [(p["method"], p["ratio"]) for p in report.pareto_front(pts[:2] + [_row("t", "y", 0.5, 0.9, 0.5)])] == \
        [("y", 0.5)]


def test_grid_table_has_a_row_per_method_and_ratio_and_a_column_per_task():
    rows = [_row(t, m, r, s, c, 1.0 if m == "vanilla" else 0.5)
            for t in ("shapes_vqa", "pope") for m, r, s, c in (("vanilla", 0, 0.8, 1.0), ("fastv", 0.5, 0.7, 0.5),
                                                                  ("fastv", 0.75, 0.6, 0.3))]
    text = report.grid_table(rows)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| method | ratio | pope | shapes_vqa |")
    assert lines[1].startswith("| vanilla | 0 | 0.800 (1.00) | 0.800 (1.00) |")
    assert [ln.split(" | ")[:2] for ln in lines[2:]] == [["| fastv", "0.5"], ["| fastv", "0.75"]]
    front = report.frontier_text(rows)
    assert "- pope / m: fastv @ 0.75 (0.3 TFLOPs, 0.600), fastv @ 0.5" in front


def test_report_draws_heat_map_and_frontier(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    write_run(tmp_path, "vanilla", 0, "20261201_101010", 0.8, 300.0)
    write_run(tmp_path, "fastv", 0.5, "20261201_111111", 0.7, 150.0)
    text = report.build_report(tmp_path)
    for name in ("report_heatmap_shapes-vlm.png", "report_frontier_shapes_vqa_shapes-vlm.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and name in text
