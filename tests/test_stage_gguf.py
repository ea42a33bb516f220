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
