#!/usr/bin/env bash
# GPU call A: prefill of every visual-token method at R=0.75 on the LLaVA-1.5-7B shape (1x576, 8x576):
# stock TTFT (vision tower included) and the fast path's prompt -> 1 token.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
M="vanilla fastv:ratio=0.75 simignore:ratio=0.75 visionzip:ratio=0.75 prumerge_plus:ratio=0.75 pdrop:ratio=0.75,layer_list=2/10/18
   sparsevlm:ratio=0.75 dart:ratio=0.75 divprune:ratio=0.75 random_prune:ratio=0.75"
for n in 1 8; do
  timeout 170 python3 -m mllm_efficiency.cli bench --model llava-1.5-7b --images $n --methods $M --decode e2e \
      --new-tokens 1 --repeats 3 --warmup 1 --out "$OUT/prefill_${n}x576" --quiet 2>&1 | grep -v Warn | tail -14
done
