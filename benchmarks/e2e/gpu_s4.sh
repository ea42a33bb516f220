#!/usr/bin/env bash
# GPU call 4: the video accuracy sweep on the new weights, then Focus vs FrameFusion at equal accuracy.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
cp -r /tmp/shapes_vlm_new "$OUT/shapes_vlm"
timeout 330 python3 benchmarks/eval/video_sweep.py --n 1000 --backbone /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
    --weights /tmp/shapes_vlm_new --out "$OUT/video_sweep" 2>&1 | grep -v -E "Warn|it/s\]" | tail -30
timeout 200 python3 benchmarks/video/equal_accuracy.py "$OUT/video_sweep/results.json" --run --out "$OUT/equal_acc" 2>&1 \
    | grep -v Warn | tail -20
