"""One error style on the command line: `error: ...` naming the parameter or file, exit code 2, before any model
loads; `eval` passes the options it does not know to lmms-eval; MLLM_EFF_LAUNCHER starts lmms-eval."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_efficiency.cli import main
from mllm_efficiency.eval import cli as eval_cli
from mllm_efficiency.eval import runner

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err


# ------------------------------------------------------------------------------------------- eval pass-through
@pytest.fixture
def recorded(monkeypatch):
    """execute() replaced by a recorder: the runs eval would start, nothing started."""
    runs = []

    def fake_execute(run, *a, **k):
        runner.validate(run)
        runs.append(run)
        return 0

    monkeypatch.setattr(runner, "execute", fake_execute)
    return runs


@pytest.mark.parametrize("entry", [main, eval_cli.main])
def test_eval_passes_unknown_options_to_lmms_eval(entry, recorded):
    rc = entry(["eval", "shapes_vqa", "shapes-vlm", "fastv", "0.5", "--seed", "1", "--limit", "3",
                "--gen_kwargs=max_new_tokens=4", "--method_args", "k=2", "--predict_only"])
    assert rc == 0
    (run,) = recorded
    assert run.method_args == "k=2"
    assert run.extra == ["--limit", "3", "--seed", "1", "--gen_kwargs=max_new_tokens=4", "--predict_only"]
    args = runner.lmms_args(run, None)
    assert args[args.index("--seed") + 1] == "1"


def test_eval_split_keeps_positionals_and_negative_ratio():
    assert eval_cli.split_argv(["eval", "--seed", "1"]) == (["eval"], ["--seed", "1"])
    assert eval_cli.split_argv(["eval", "t", "m", "fastv", "-0.1"]) == (["eval", "t", "m", "fastv", "-0.1"], [])
    assert eval_cli.split_argv(["report", "d", "--seed", "1"]) == (["report", "d", "--seed", "1"], [])


def test_other_verbs_still_reject_unknown_options(capsys):
    assert main(["methods", "--seed", "1"]) == 2
    assert "unrecognized arguments: --seed 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- model check
@pytest.mark.parametrize("model, needle", [
    ("/nonexistent/model", "MODEL '/nonexistent/model' does not exist"),
    ("smollm2-135m", "text-only zoo alias"),
    ("no-such-org/no-such-model", "does not exist"),
])
def test_eval_rejects_missing_model_before_lmms_eval(model, needle, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["eval", "shapes_vqa", model, "fastv", "0.5"]) == 2
    _one_error_line(capsys.readouterr().err, needle)


def test_eval_model_check_accepts_directories_with_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(Exception, match="without config.json"):
        runner.check_model(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    runner.check_model(str(tmp_path / "m"))
    runner.check_model("shapes-vlm")


def test_eval_model_check_allows_hub_ids_only_when_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user asked for downloads: lmms-eval may fetch it
    runner.check_model("no-such-org/no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match="does not exist"):
        runner.check_model("no-such-org/no-such-model")
    with pytest.raises(Exception, match="does not exist"):
        runner.check_model("a/b..c")  # an id the hub's validator rejects


def test_run_eval_sh_rejects_missing_model_fast():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_eval.sh"), "shapes_vqa", "/nonexistent/model",
                           "fastv", "0.5"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    _one_error_line(proc.stderr, "/nonexistent/model")
    assert "[run_eval]" not in proc.stdout  # lmms-eval never started


# ------------------------------------------------------------------------------------------- launcher
FAKE_LAUNCHER = """import json, os, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--output_path") + 1])
(out / "m").mkdir(parents=True, exist_ok=True)
(out / "m" / "20260101_000000_results.json").write_text(json.dumps({"results": {}, "config": {}}))
Path(os.environ["LAUNCH_LOG"]).write_text(json.dumps(args))
"""


def test_launcher_variable_starts_lmms_eval(tmp_path, monkeypatch):
    fake = tmp_path / "fake launcher.py"
    fake.write_text(FAKE_LAUNCHER)
    monkeypatch.setenv("MLLM_EFF_LAUNCHER", f"{sys.executable} '{fake}' --num_processes 2")
    monkeypatch.setenv("LAUNCH_LOG", str(tmp_path / "log.json"))
    run = runner.EvalRun("shapes_vqa", "shapes-vlm", "fastv", 0.5, "", [], str(tmp_path / "res"))
    assert runner.execute(run) == 0
    args = json.loads((tmp_path / "log.json").read_text())
    assert args[:3] == ["--num_processes", "2", "-m"] and args[3] == "mllm_efficiency.eval.lmms_main"


def test_launcher_variable_naming_a_missing_program(capsys, monkeypatch):
    monkeypatch.setenv("MLLM_EFF_LAUNCHER", "no-such-launcher --num_processes 2")
    assert main(["eval", "shapes_vqa", "shapes-vlm", "fastv", "0.5"]) == 2
    _one_error_line(capsys.readouterr().err, "MLLM_EFF_LAUNCHER: 'no-such-launcher'")


# ------------------------------------------------------------------------------------------- default job table
def _fake_result(out: Path, run, n: int, stamp: str) -> Path:
    path = out / "shapes-vlm" / f"{stamp}_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    args = f"pretrained={run.model},method={run.method},ratio={run.ratio}"
    path.write_text(json.dumps({"results": {"shapes_vqa": {"exact_match,none": 0.5}},
                                "config": {"model_args": args}, "n-samples": {"shapes_vqa": {"effective": n}}}))
    return path


def test_default_job_table_shows_only_its_own_runs(tmp_path, monkeypatch, capsys):
    root = tmp_path / "results"
    earlier = runner.EvalRun("shapes_vqa", "shapes-vlm", "fastv", 0.5, "", [], str(root))
    _fake_result(earlier.output_dir, earlier, 20, "20250101_000000")  # an earlier `--limit 20` run, same tree

    def fake_execute(run, *a, **k):
        runner.validate(run)
        results = _fake_result(run.output_dir, run, 200, "20260101_000000")
        (run.output_dir / "run.json").write_text(json.dumps({"results": str(results)}))
        return 0

    monkeypatch.setattr(runner, "execute", fake_execute)
    assert main(["eval", "--results_root", str(root)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| shapes_vqa")]
    assert len(rows) == 2 and all("| 200 |" in r for r in rows), out
    assert "| 20 |" not in out


# ------------------------------------------------------------------------------------------- quick-start
def _qs_files(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Question: key?\nsome text")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  type: qllm\n  n_local: 64\n  exc_block_size: 32\n")
    return prompt, cfg


@pytest.mark.parametrize("case, needle", [
    ("bad_yaml_value", "block_size"),
    ("yaml_syntax", "yaml: cannot parse"),
    ("binary_yaml", "is not a UTF-8 text file"),
    ("binary_prompt", "--prompt: "),
    ("missing_prompt", "does not exist"),
    ("missing_model", "/nonexistent/model"),
])
def test_quick_start_errors_are_one_line_rc2(case, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # the PyYAML path
    prompt, cfg = _qs_files(tmp_path)
    model = "/nonexistent/model" if case == "missing_model" else "/never/loaded"
    if case == "bad_yaml_value":
        cfg.write_text("model:\n  type: qllm\n  block_size: -3\n")
    elif case == "yaml_syntax":
        cfg.write_text("model:\n  type: [qllm\n  n_local: 64\n")
    elif case == "binary_yaml":
        cfg.write_bytes(b"\xff\xfe\x00model\x80\x81")
    elif case == "binary_prompt":
        prompt.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    elif case == "missing_prompt":
        prompt = tmp_path / "nope.txt"
    rc = main(["quick-start", "--prompt", str(prompt), "--yaml", str(cfg), "--model", model])
    err = capsys.readouterr().err
    assert rc == 2
    _one_error_line(err, needle)
    if case in ("yaml_syntax", "binary_yaml"):
        assert str(cfg) in err
    if case == "binary_prompt":
        assert str(prompt) in err


def test_memory_module_entry_prints_one_error_line(tmp_path, capsys):
    from mllm_efficiency.memory import cli as memory_cli

    prompt, cfg = _qs_files(tmp_path)
    cfg.write_text("model:\n  type: nosuch\n")
    assert memory_cli.main(["quick-start", "--prompt", str(prompt), "--yaml", str(cfg)]) == 2
    _one_error_line(capsys.readouterr().err, "type must be one of")


# ------------------------------------------------------------------------------------------- bench
@pytest.mark.parametrize("argv, needle", [
    (["--model", "tiny-llama", "--methods", "nosuch"], "unknown method"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bench_errors_are_one_line_rc2(argv, needle, tmp_path, capsys):
    assert main(["bench", *argv, "--out", str(tmp_path), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "bench.json").exists()


@pytest.mark.slow  # ~30 s on 2 CPU cores: two lmms-eval processes each load shapes-vlm
@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="needs lmms-eval (the eval extra)")
def test_launcher_runs_two_cpu_processes(tmp_path):
    """MLLM_EFF_LAUNCHER with a real 2-process launch on CPU (accelerate's --multi_gpu starts torchrun with gloo
    on a machine without GPUs): lmms-eval shards the questions over both ranks and gathers all of them."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.is_file():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    env = {**os.environ, "MLLM_EFF_LAUNCHER": f"{shlex.quote(str(accelerate))} launch --multi_gpu --num_processes 2",
           "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mllm_efficiency.cli", "eval", "shapes_vqa", "shapes-vlm", "fastv",
                           "0.5", "--limit", "4", "--results_root", str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "--num_processes 2 -m mllm_efficiency.eval.lmms_main" in log
    assert "on rank 1" in log, log[-3000:]
    (result,) = (tmp_path / "shapes_vqa" / "shapes-vlm" / "fastv_0.5").rglob("*_results.json")
    assert json.loads(result.read_text())["n-samples"]["shapes_vqa"]["effective"] == 4


@pytest.mark.parametrize("flag, value, needle", [("--chunk-size", "0", "chunk_size must be >= 1"),
                                                 ("--max-new-tokens", "-1", "max_new_tokens must be >= 0")])
def test_quick_start_rejects_bad_sizes_before_loading(flag, value, needle, tmp_path, capsys):
    prompt, cfg = _qs_files(tmp_path)
    assert main(["quick-start", "--prompt", str(prompt), "--yaml", str(cfg), "--model", "/never/loaded",
                 flag, value]) == 2
    assert needle in capsys.readouterr().err
