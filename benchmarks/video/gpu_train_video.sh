#!/usr/bin/env bash
# Fine-tune the embedded shapes VLM to shapes_video on one GPU, from the stored weights, then (optionally) run the
# video accuracy sweep on the new weights in the same command.
#
# Needs: the SmolLM2-135M-Instruct GGUF staged at /tmp/smol.gguf (scripts/stage_gguf.py), torch, transformers,
# safetensors, pillow, gguf. Writes under $OUT (default /tmp/out):
#   $OUT/shapes_vlm/{vision_projector.safetensors,train_info.json}   new weights + held-out image / video accuracy
#   $OUT/train.log
#   $OUT/video_sweep/...                                             with SWEEP=1 (results.md, report.md, plots)
#
# Usage (from the repository root):
#   bash benchmarks/video/gpu_train_video.sh                 # train only: MINUTES=6.5 of training, ~7.5 min wall
#   SWEEP=1 MINUTES=5 bash benchmarks/video/gpu_train_video.sh   # train 5 min + sweep (~3 min): < 10 min wall
# Knobs (environment): MINUTES, VIDEO_FRACTION (0.5), BATCH (128 images/step), VIDEO_BATCH (64 clips/step),
# FRAMES (8), WORKERS (12), GGUF (/tmp/smol.gguf), INIT (the stored weights), SWEEP_N (1000).
set -euo pipefail
OUT=${OUT:-/tmp/out}
GGUF=${GGUF:-/tmp/smol.gguf}
INIT=${INIT:-src/mllm_efficiency/eval/assets/shapes_vlm}
MINUTES=${MINUTES:-6.5}
FRAMES=${FRAMES:-8}
mkdir -p "$OUT"
if [ ! -s "$GGUF" ]; then
  echo "error: $GGUF is missing: stage it first (scripts/stage_gguf.py)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
export PYTHONPATH=src
start=$(date +%s)
python scripts/train_tiny_vlm.py --backbone "$GGUF" --init "$INIT" \
  --vision-layers 1 --vision-feature-layer 0 --lora-rank 16 --lora-alpha 32 \
  --video-fraction "${VIDEO_FRACTION:-0.5}" --video-frames "$FRAMES" \
  --batch-size "${BATCH:-128}" --video-batch-size "${VIDEO_BATCH:-64}" \
  --lr 5e-4 --lora-lr 5e-4 --warmup 30 --eval-every 100 --log-every 25 \
  --max-minutes "$MINUTES" --save-every 2 --workers "${WORKERS:-12}" \
  --eval-samples 400 --video-eval-samples 400 \
  --out "$OUT/shapes_vlm" 2>&1 | tee "$OUT/train.log"
mkdir -p /tmp/shapes_vlm_new && cp -r "$OUT/shapes_vlm/." /tmp/shapes_vlm_new/
echo "training command done after $(( $(date +%s) - start )) s"
python - "$OUT/shapes_vlm/train_info.json" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
img, vid = info.get("heldout_accuracy") or {}, info.get("heldout_video_accuracy") or {}
print(f"held-out images: {img.get('all')}  (target >= 0.90)  {img}")
print(f"held-out video:  {vid.get('all')}  (target >= 0.85)  {vid}")
print(f"steps {info.get('steps')}, {info.get('train_seconds')} s of training")
EOF
if [ "${SWEEP:-0}" = "1" ]; then
  python benchmarks/eval/video_sweep.py --n "${SWEEP_N:-1000}" --frames "$FRAMES" --backbone "$GGUF" \
    --weights "$OUT/shapes_vlm" --out "$OUT/video_sweep" 2>&1 | tee "$OUT/video_sweep.log"
  echo "sweep done after $(( $(date +%s) - start )) s"
fi
