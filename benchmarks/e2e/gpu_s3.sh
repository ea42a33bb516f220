#!/usr/bin/env bash
# GPU call 3: GGUF piece 2 (the file is complete), then the shapes-vlm video fine-tune (weights kept in /tmp).
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash .stage/smollm2/append.sh 2 | tail -1
GGUF=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf MINUTES=${MINUTES:-6.3} timeout 580 bash benchmarks/video/gpu_train_video.sh 2>&1 \
    | grep -v -E "Warn|it/s\]" | tail -25
