"""`mllm-eff bench` command line: a CPU smoke run writes JSON / markdown, bad input gives clear errors."""
from __future__ import annotations

import json

import pytest

from mllm_efficiency.cli import main


def test_cli_smoke_two_methods(tmp_path, capsys):
    rc = main(["bench", "--model", "tiny-llama", "--context", "48", "--methods", "vanilla",
               "snapkv:ratio=0.5,window=4", "streamingllm:ratio=0.5", "--new-tokens", "2", "--decode-warmup", "1",
               "--warmup", "0", "--repeats", "1", "--threads", "1", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["prompt"]["length"] == 48 and data["settings"]["decode"] == "hf"
    assert data["bandwidth"]["bytes_per_s"] > 0
    labels = [e["entry"] for e in data["entries"]]
    assert labels == ["vanilla", "snapkv:ratio=0.5,window=4", "streamingllm:ratio=0.5"]
    for e in data["entries"]:
        for key in ("ttft", "kv_bytes", "stored_lengths", "prefill_flops", "flops_ratio", "kv_reduction"):
            assert key in e, key
        d = e["decode_hf"]
        assert d["tokens_per_s"] > 0 and d["roofline_ms"] > 0 and d["step"]["p10_ms"] <= d["step"]["p90_ms"]
    van, snap, _ = data["entries"]
    assert snap["kv_bytes"] < van["kv_bytes"] and van["kv_reduction"] == 0.0
    md = (tmp_path / "bench.md").read_text()
    for label in labels:
        assert f"| {label} |" in md
    assert "TTFT ms" in md and "hf tok/s" in md


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "vanilla", "snapkv:ratio=1.2"], "ratio must be"),
    (["--methods", "fastv:k=2;ratio=0.5"], "fastv"),
    (["--methods", "nosuch"], "unknown method"),
    (["--images", "1", "--tokens-per-image", "10"], "tokens_per_image"),
    (["--decode", "turbo"], "invalid choice"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, needle):
    rc = main(["bench", "--model", "tiny-llama", "--out", str(tmp_path), "--quiet"] + argv)
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_cli_unknown_model(tmp_path, capsys):
    rc = main(["bench", "--model", "no-such-model-xyz", "--out", str(tmp_path), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no-such-model-xyz" in err and "llava-1.5-7b" in err


def test_cli_images_on_text_model(tmp_path, capsys):
    rc = main(["bench", "--model", "tiny-llama", "--images", "1", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "vision-language" in capsys.readouterr().err
