"""scripts/stage_gguf.py: pieces reassemble to the original bytes and the append script checks the digest."""
import hashlib
import shutil
import subprocess

import pytest
from conftest import load_script


def _module():
    return load_script("scripts/stage_gguf.py")


def test_pieces_reassemble_and_digest_is_checked(tmp_path):
    stage = _module()
    data = bytes(range(256)) * 41 + b"tail"  # 10,500 bytes: 3 pieces of 4,000
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    pieces = stage.split_file(src, tmp_path / "stage", 4000)
    assert [p.stat().st_size for p in pieces] == [4000, 4000, 2500]
    assert b"".join(p.read_bytes() for p in pieces) == data
    assert stage.sha256(src) == hashlib.sha256(data).hexdigest()

    if shutil.which("bash") is None or shutil.which("sha256sum") is None:
        pytest.skip("needs bash and sha256sum")
    target = tmp_path / "target"
    target.mkdir()
    script = tmp_path / "stage" / "append.sh"
    script.write_text(stage.append_script("model.gguf", 3, stage.sha256(src), str(target)))
    for i in range(3):
        subprocess.run(["bash", str(script), str(i)], check=True, capture_output=True)
    assert (target / "model.gguf").read_bytes() == data

    bad = tmp_path / "stage" / "bad.sh"
    bad.write_text(stage.append_script("model.gguf", 3, "0" * 64, str(target)))
    for i in range(2):
        subprocess.run(["bash", str(bad), str(i)], check=True, capture_output=True)
    assert subprocess.run(["bash", str(bad), "2"], capture_output=True).returncode != 0  # wrong digest fails


def test_split_keeps_files_that_are_not_its_pieces(tmp_path):
    stage = _module()
    src = tmp_path / "model.gguf"
    src.write_bytes(b"x" * 2500)
    out = tmp_path / "stage"
    out.mkdir()
    for name in ("partners.csv", "part", "part1.txt", "parts"):
        (out / name).write_text("user data")
    (out / "part007").write_bytes(b"stale piece of an earlier run")
    pieces = stage.split_file(src, out, 1000)
    assert [p.name for p in pieces] == ["part000", "part001", "part002"]
    assert not (out / "part007").exists()
    for name in ("partners.csv", "part", "part1.txt", "parts"):
        assert (out / name).read_text() == "user data"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None,
                    reason="needs bash and sha256sum")
def test_append_script_quotes_paths(tmp_path):
    stage = _module()
    data = b"0123456789" * 300
    src = tmp_path / "m.gguf"
    src.write_bytes(data)
    stage_dir = tmp_path / "stage dir"  # a space in the piece directory
    pieces = stage.split_file(src, stage_dir, 1000)
    target = tmp_path / "tar get"
    target.mkdir()
    crafted = "a b;touch pwned;$(touch pwned2)`touch pwned3`'x.gguf"  # runs commands if interpolated unquoted
    script = stage_dir / "append.sh"
    script.write_text(stage.append_script(crafted, len(pieces), stage.sha256(src), str(target)))
    for i in range(len(pieces)):
        proc = subprocess.run(["bash", str(script), str(i)], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("pwned*"))
    assert (target / crafted).read_bytes() == data
    bad = subprocess.run(["bash", str(script), "1;true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "piece number" in bad.stderr
