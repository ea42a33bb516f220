"""Memory YAML configs (validation, shipped presets) and the `quick-start` command end to end on a tiny model."""
from __future__ import annotations

import csv
import glob
import json
from pathlib import Path

import pytest
import torch

from mllm_efficiency.cli import main as cli_main
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.memory import load_memory_config
from mllm_efficiency.memory.cli import CSV_COLUMNS, find_question, read_prompts
from mllm_efficiency.testing import tiny_llama_lm

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(glob.glob(str(ROOT / "configs" / "memory" / "*.yaml")))


def _yaml(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_presets_load_and_match_the_spec():
    assert len(PRESETS) >= 20
    for path in PRESETS:
        cfg = load_memory_config(path)
        assert cfg.method in ("qllm", "infllm", "streamingllm_memory", "lm_infinite")
    c = load_memory_config(ROOT / "configs/memory/llama3-qllm-2k.yaml").method_config
    assert (c.n_local, c.block_size, c.topk, c.exc_block_size, c.question_weight) == (1024, 128, 8, 512, 4)
    c = load_memory_config(ROOT / "configs/memory/mistral-inf-llm-512.yaml")
    assert c.method == "infllm" and c.method_config.n_local + c.method_config.topk * c.method_config.block_size == 512


@pytest.mark.parametrize("text,match", [
    ("model:\n  type: qllm\n  n_lokal: 3\n", r"unknown key\(s\) \['model.n_lokal'\]"),
    ("model:\n  type: qllm\nchunksize: 3\n", r"unknown top-level key\(s\) \['chunksize'\]"),
    ("model:\n  n_local: 3\n", "model.type is required"),
    ("model:\n  type: fancy\n", "type must be one of"),
    ("model:\n  type: inf-llm\n  n_local: 256\n  exc_block_size: 512\n", r"exc_block_size must be in \[1, 256\]"),
    ("model:\n  type: inf-llm\n  topk: 8\n  max_cached_block: 4\n", r"max_cached_block must be in \[8, inf\]"),
    ("model:\n  type: qllm\n  question_weight: -1\n", "question_weight must be in"),
    ("model:\n  type: qllm\n  cache_strategy: lfu\n", "cache_strategy must be one of"),
    ("model:\n  type: qllm\n  faiss: true\n", "faiss"),
    ("model:\n  type: qllm\n  exc_block_size: 512\nchunk_size: 100\n", "chunk_size must be >= model.exc_block_size"),
    ("model:\n  type: qllm\ntruncation: prefix\n", "truncation must be one of"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_yaml_validation_messages(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_memory_config(_yaml(tmp_path, text))


def test_yaml_missing_file_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_memory_config(tmp_path / "nope.yaml")
    cfg = load_memory_config(_yaml(tmp_path, "model:\n  type: stream-llm\n  fattn: true\n"), n_local=64,
                             exc_block_size=64)
    assert cfg.method == "streamingllm_memory" and cfg.kwargs["kernel"] == "flex" and cfg.kwargs["n_local"] == 64


def test_prompt_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("['first prompt', \"second\\nQuestion: what?\"]")
    rows = read_prompts(str(tmp_path / "a.txt"))
    assert [r["prompt"] for r in rows] == ["first prompt", "second\nQuestion: what?"]
    assert find_question(rows[1]["prompt"], r"Question:\s*(.+)") == "what?"
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "x", "prompt": "p", "question": "q"}) + "\n")
    assert read_prompts(str(tmp_path / "b.jsonl")) == [{"id": "x", "prompt": "p", "question": "q"}]
    (tmp_path / "c.txt").write_text("just text\nmore")
    assert read_prompts(str(tmp_path / "c.txt"))[0]["prompt"] == "just text\nmore"
    (tmp_path / "d.txt").write_text("[__import__('os')]")
    with pytest.raises(ConfigError, match="not a Python literal"):
        read_prompts(str(tmp_path / "d.txt"))


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars[:120])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    model = tiny_llama_lm(num_layers=2, vocab_size=128)
    model.save_pretrained(d)
    tok = _char_tokenizer()
    assert max(tok("Question: what? {}~")["input_ids"]) < 128
    tok.save_pretrained(d)
    return d


def test_quick_start_end_to_end(tmp_path, tiny_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    filler = "The grass is green. " * 12
    prompts.write_text(repr([f"Question: key?\n{filler}Question: key?", f"{filler}\nQuestion: sky?"]))
    cfg = _yaml(tmp_path, "model:\n  type: qllm\n  n_init: 4\n  n_local: 64\n  block_size: 16\n  topk: 2\n"
                          "  repr_topk: 2\n  max_cached_block: 4\n  exc_block_size: 32\nchunk_size: 100\n"
                          "max_new_tokens: 4\n")
    out_dir = tmp_path / "out"
    rc = cli_main(["quick-start", "--prompt", str(prompts), "--yaml", cfg, "--non_query_aware", "false",
                   "--record_csv", "true", "--model", str(tiny_dir), "--out_dir", str(out_dir), "--no-progress"])
    assert rc == 0
    files = list(out_dir.rglob("*.csv"))
    assert len(files) == 1 and files[0].parts[-3:-1] == ("query_aware_2_query", "c")
    rows = list(csv.DictReader(open(files[0])))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["query_index"] for r in rows] == ["0", "1"] and all(r["batch_size"] == "2" for r in rows)
    assert all(int(r["input_tokens"]) > 200 and int(r["tokens_generated"]) <= 4 for r in rows)
    assert all(r["mode"] == "query_aware" for r in rows)
    # non-query-aware, explicit CSV path, underscores and dashes both accepted
    target = tmp_path / "nqa.csv"
    rc = cli_main(["quick-start", "--prompt", str(prompts), "--yaml", cfg, "--non-query-aware", "true",
                   "--record-csv", str(target), "--model", str(tiny_dir), "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(target)))
    assert [r["mode"] for r in rows] == ["non_query_aware"] * 2


def test_quick_start_missing_question_names_the_prompt(tmp_path, tiny_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(repr(["Question: a?\nx", "no question here"]))
    cfg = _yaml(tmp_path, "model:\n  type: qllm\n  n_local: 64\n  exc_block_size: 32\n")
    assert cli_main(["quick-start", "--prompt", str(prompts), "--yaml", cfg, "--model", str(tiny_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: prompt 1: no question found")
    assert cli_main(["quick-start", "--prompt", str(prompts), "--yaml", cfg, "--non-query-aware", "maybe"]) == 2


def test_quick_start_baseline_matches_memory_inside_window(tmp_path, tiny_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Question: sky?\nThe sky is blue.")
    cfg = _yaml(tmp_path, "model:\n  type: inf-llm\n  n_local: 128\n  exc_block_size: 32\nmax_new_tokens: 5\n")
    outs = {}
    for extra in ([], ["--baseline"]):
        target = tmp_path / f"o{len(extra)}.csv"
        assert cli_main(["quick-start", "--prompt", str(prompts), "--yaml", cfg, "--non-query-aware", "true",
                         "--record-csv", str(target), "--model", str(tiny_dir), "--no-progress", *extra]) == 0
        outs[len(extra)] = list(csv.DictReader(open(target)))[0]
    assert outs[1]["mode"] == "vanilla"
    assert outs[0]["output_text"] == outs[1]["output_text"]
    torch.manual_seed(0)
