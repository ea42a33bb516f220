#!/usr/bin/env bash
# GPU call 2: GGUF piece 1; prefill of every visual-token method at R=0.75 on the LLaVA-1.5-7B shape (1x576, 8x576).
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash .stage/smollm2/append.sh 1 | tail -1
M="vanilla fastv:ratio=0.75 simignore:ratio=0.75 visionzip:ratio=0.75 prumerge_plus:ratio=0.75 pdrop:ratio=0.75
   sparsevlm:ratio=0.75 dart:ratio=0.75 divprune:ratio=0.75 random_prune:ratio=0.75"
for n in 1 8; do
  timeout 280 python3 -m mllm_efficiency.cli bench --model llava-1.5-7b --images $n --methods $M --decode e2e \
      --new-tokens 1 --repeats 5 --warmup 2 --out "$OUT/prefill_${n}x576" --quiet 2>&1 | grep -v Warn | tail -16
done
