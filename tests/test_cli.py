"""The `mllm-eff` command: help lists the methods, `methods` shows config fields, `demo` passes its own
checks, `flops` reproduces the paper's FLOPs column, bad arguments exit 2 naming the parameter."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

import mllm_efficiency as me
from mllm_efficiency.cli import main
from mllm_efficiency.registry import method_specs


def test_help_lists_methods(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out
    for name in me.available_methods():
        assert name in out
    for cmd in ("methods", "demo", "flops"):
        assert cmd in out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "fastv" in capsys.readouterr().out


def test_methods_prints_config_fields_with_defaults(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    spec = {s.name: s for s in method_specs()}["fastv"]
    assert "fastv" in out and spec.family in out and spec.summary in out
    for f in dataclasses.fields(spec.config_cls):
        assert f"{f.name} = {f.default!r}" in out


def test_demo_runs_and_passes_its_checks(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    path = tmp_path / "demo.json"
    assert main(["demo", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # the demo's single-thread setting is restored
    out = capsys.readouterr().out
    assert "ratio 0: identical logits ✓" in out
    result = json.loads(path.read_text())
    assert result["checks_passed"] and result["ratio0_identical"]
    assert [r["ratio"] for r in result["runs"]] == [0.5, 0.75]
    assert result["prompt"]["num_visual"] == 2 * 64  # 2 images x 64 tokens
    L, N = result["prompt"]["length"], result["prompt"]["num_visual"]
    for run in result["runs"]:
        keep = max(1, min(N, round(N * (1 - run["ratio"]))))
        assert run["kept_visual"] == keep
        assert run["cache_lengths"] == [L, L] + [L - N + keep] * 2  # k=2 of 4 layers
        assert run["cache_lengths_api"] == run["cache_lengths"]
        assert run["inplace_vs_mask_max_diff"] <= 1e-4
        assert len(run["generated"]) == 8


def test_demo_k0_random_scorer(capsys):
    assert main(["demo", "--k", "0", "--ratios", "0.5", "--images", "1", "--image-size", "32",
                 "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "scorer='random'" in out
    assert "kept visual tokens: 8/16" in out


@pytest.mark.parametrize("argv", [
    ["demo", "--ratios", "1.0"],
    ["demo", "--ratios", "0.5", "-0.1"],
    ["demo", "--ratio", "abc"],
    ["flops", "--ratio", "1.5"],
])
def test_bad_ratio_exits_2_naming_ratio(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ratio" in err and "[0, 1)" in err


def test_bad_k_exits_2_naming_k(capsys):
    assert main(["demo", "--k", "4"]) == 2  # the demo model has 4 layers
    assert "--k" in capsys.readouterr().err
    assert main(["flops", "--k", "32"]) == 2  # LLaVA-1.5-7B has 32 layers
    assert "--k" in capsys.readouterr().err
    assert main(["demo", "--k", "-1"]) == 2
    assert "k must be >= 0" in capsys.readouterr().err


def test_unknown_preset_exits_2(capsys):
    assert main(["flops", "--preset", "gpt-5"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_flops_reproduces_paper_column(capsys):
    pytest.importorskip("mllm_efficiency.flops")
    assert main(["flops", "--preset", "llava-1.5-7b", "--k", "2", "--ratio", "0.5", "0.75"]) == 0
    out = capsys.readouterr().out
    # docs/token_pruning.md, FLOPs accounting: baseline 99.33, K=2 R=50% 54.79, R=75% 33.00 (GFLOPs per layer, Eq. 5)
    assert "99.33" in out and "54.79" in out and "33.00" in out
    assert main(["flops", "--preset", "llava-1.5-13b", "--k", "2", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "154.64" in out and "84.60" in out


@pytest.mark.skipif(shutil.which("mllm-eff") is None, reason="console script not installed")
def test_console_script_help():
    proc = subprocess.run(["mllm-eff", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "fastv" in proc.stdout


def test_module_entry_bad_ratio():
    proc = subprocess.run([sys.executable, "-m", "mllm_efficiency.cli", "flops", "--ratio", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "ratio" in proc.stderr
