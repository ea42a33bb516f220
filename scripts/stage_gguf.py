#!/usr/bin/env python
"""Split a model alias's GGUF into pieces small enough to send to a remote GPU machine one command at a time.

The GPU machine reaches no package registry and each command there can bring only ~64 MiB of files, so a real
model travels in pieces that are appended under /tmp on consecutive commands (the machine keeps /tmp while it
stays warm). This writes the pieces plus `append.sh` into OUT_DIR (keep it git-ignored):

    python scripts/stage_gguf.py smollm2-135m .stage/smollm2            # 2 pieces of <= 50 MB
    python scripts/stage_gguf.py qwen2.5-coder-0.5b .stage/qwen --piece-mb 50

On the GPU machine, command i (carrying OUT_DIR/append.sh and OUT_DIR/partNNN, NNN = i with three digits) runs
    bash OUT_DIR/append.sh <i>
which appends piece i to /tmp/<file>.gguf (piece 0 starts it) and, after the last piece, checks the SHA-256;
then pass `/tmp/<file>.gguf` wherever a model path is accepted (e.g. --backbone, --gguf, --model).
Only this script's own files in OUT_DIR are replaced (`partNNN` pieces of an earlier run, `append.sh`); anything
else there is left alone. Every path in `append.sh` is shell-quoted.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


PIECE_RE = re.compile(r"part\d{3,}")  # the pieces this script writes: part000, part001, ...


def piece_name(i: int) -> str:
    return f"part{i:03d}"


def split_file(path: Path, out_dir: Path, piece_bytes: int) -> list[Path]:
    """Write `path` as pieces of `piece_bytes` into `out_dir`, first removing the pieces of an earlier run (files
    named exactly partNNN; nothing else in `out_dir` is touched)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        if PIECE_RE.fullmatch(old.name) and old.is_file():
            old.unlink()
    pieces = []
    with open(path, "rb") as f:
        while chunk := f.read(piece_bytes):
            piece = out_dir / piece_name(len(pieces))
            piece.write_bytes(chunk)
            pieces.append(piece)
    return pieces


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def append_script(file_name: str, n_pieces: int, digest: str, target_dir: str = "/tmp") -> str:
    """The bash script that appends piece I to TARGET_DIR/FILE_NAME. Names are shell-quoted (a space works, a
    crafted name runs nothing); the digest is checked by reading the file on stdin (no file-name parsing)."""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"digest must be 64 lowercase hex digits, got {digest!r}")
    target = shlex.quote(f"{target_dir}/{file_name}")
    return f"""#!/usr/bin/env bash
# bash append.sh I : append piece I (of {n_pieces}, file partNNN with NNN = I in three digits) to the target below;
# piece 0 starts the file
set -euo pipefail
target={target}
i="$1"
case "$i" in ''|*[!0-9]*) echo "append.sh: I must be a piece number in [0, {n_pieces - 1}], got '$i'" >&2; exit 2;; esac
i=$((10#$i))
here="$(dirname "$0")"
piece="$(printf '%s/part%03d' "$here" "$i")"
if [ "$i" -eq 0 ]; then cat -- "$piece" > "$target"; else cat -- "$piece" >> "$target"; fi
if [ "$i" -eq {n_pieces - 1} ]; then
  actual="$(sha256sum < "$target" | cut -d' ' -f1)"
  if [ "$actual" != {digest} ]; then
    echo "append.sh: SHA-256 mismatch for $target: $actual, expected {digest}" >&2
    exit 1
  fi
  echo "$target: OK (sha256 {digest})"
fi
ls -l -- "$target"
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="zoo alias (e.g. smollm2-135m, qwen2.5-coder-0.5b) or a .gguf path")
    p.add_argument("out_dir")
    p.add_argument("--piece-mb", type=int, default=50, help="piece size in MB (10^6 bytes); default 50")
    args = p.parse_args(argv)
    if args.piece_mb < 1:
        p.error(f"--piece-mb must be >= 1, got {args.piece_mb}")
    from mllm_efficiency.zoo import resolve_model

    source = resolve_model(args.model)
    if source.format != "gguf":
        p.error(f"{args.model} is not a GGUF model ({source.format})")
    out = Path(args.out_dir)
    pieces = split_file(Path(source.path), out, args.piece_mb * 10 ** 6)
    digest = source.sha256 or sha256(Path(source.path))
    script = out / "append.sh"
    script.write_text(append_script(Path(source.path).name, len(pieces), digest))
    print(f"{source.path} -> {len(pieces)} pieces in {out}/ (sha256 {digest[:16]}...)")
    for i in range(len(pieces)):
        print(f"  device command {i}: carry [{out / 'append.sh'}, {out / piece_name(i)}]; "
              f"run: bash {shlex.quote(str(out / 'append.sh'))} {i}")
    print(f"then use /tmp/{Path(source.path).name} as the model path (bring the gguf wheel for loading)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
