"""`mllm-eff sweep`: the grid (one vanilla per task + task x method x ratio), resumable, reported once."""
from __future__ import annotations

import json
from pathlib import Path

from mllm_efficiency.eval import sweep as sweep_mod


def fake_run(calls):
    """A stand-in for runner.execute: writes what run_eval would (results JSON, samples, run.json)."""
    def run(r):
        calls.append((r.task, r.method, r.ratio))
        out = r.output_dir / "shapes-vlm"
        out.mkdir(parents=True, exist_ok=True)
        score = 0.8 - r.ratio / 2
        results = out / "20261201_101010_results.json"
        results.write_text(json.dumps({
            "results": {r.task: {"exact_match,none": score}},
            "config": {"model_args": f"pretrained=shapes-vlm,method={r.method},ratio={r.ratio}"},
            "n-samples": {r.task: {"effective": 2}}}))
        answers = ["red", "no"] if r.ratio < 0.6 else ["blue", "no"]
        (out / f"20261201_101010_samples_{r.task}.jsonl").write_text("".join(
            json.dumps({"doc_id": i, "filtered_resps": a, "exact_match": float(a == "red")}) + "\n"
            for i, a in enumerate(answers)))
        (r.output_dir / "run.json").write_text(json.dumps({"results": str(results)}))
        return 0
    return run


def test_sweep_runs_the_grid_once_and_resumes(tmp_path):
    calls, logs = [], []
    root = tmp_path / "results"
    rc = sweep_mod.sweep("shapes_vqa,pope", "shapes-vlm", "fastv,random", "0.5,0.75", results_root=str(root),
                         with_plots=False, run=fake_run(calls), log=logs.append)
    assert rc == 0
    assert len(calls) == 2 * (1 + 2 * 2)  # per task: vanilla + 2 methods x 2 ratios
    assert calls[0] == ("shapes_vqa", "vanilla", 0.0)
    md = (root / "sweep_shapes-vlm" / "report.md").read_text()
    assert "| method | ratio | pope | shapes_vqa |" in md
    rows = json.loads((root / "sweep_shapes-vlm" / "report.json").read_text())
    assert len(rows) == 10
    loyal = {(r["task"], r["method"], r["ratio"]): r["loyalty"] for r in rows}
    assert loyal[("pope", "vanilla", 0.0)] == 1.0
    assert loyal[("pope", "fastv", 0.5)] == 1.0 and loyal[("pope", "fastv", 0.75)] == 0.5

    # a second sweep with one more ratio runs only the new cells
    calls.clear()
    assert sweep_mod.sweep("shapes_vqa,pope", "shapes-vlm", "fastv,random", "0.5,0.75,0.25",
                           results_root=str(root), with_plots=False, run=fake_run(calls), log=logs.append) == 0
    assert sorted(calls) == sorted((t, m, 0.25) for t in ("shapes_vqa", "pope") for m in ("fastv", "random"))
    assert any("done earlier" in line for line in logs)


def test_sweep_checks_every_run_before_starting(tmp_path):
    import pytest

    from mllm_efficiency.errors import ConfigError

    calls = []
    with pytest.raises(ConfigError, match="unknown method"):
        sweep_mod.sweep("shapes_vqa", "shapes-vlm", "fastv,nosuch", "0.5", results_root=str(tmp_path),
                        run=fake_run(calls), log=lambda s: None)
    assert calls == []


def test_sweep_cli_reports_bad_ratio(capsys):
    from mllm_efficiency.eval import cli

    assert cli.main(["sweep", "shapes_vqa", "shapes-vlm", "fastv", "1.5"]) == 2
    assert "RATIO must be in [0, 1)" in capsys.readouterr().err


def test_sweep_finished_needs_the_results_file(tmp_path):
    from mllm_efficiency.eval.runner import EvalRun

    run = EvalRun("pope", "shapes-vlm", "fastv", 0.5, results_root=str(tmp_path))
    assert sweep_mod.finished(run) is None
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "run.json").write_text(json.dumps({"results": str(tmp_path / "gone.json")}))
    assert sweep_mod.finished(run) is None
    Path(tmp_path / "gone.json").write_text("{}")
    assert sweep_mod.finished(run) == tmp_path / "gone.json"
