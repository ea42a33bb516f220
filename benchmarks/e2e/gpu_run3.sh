#!/usr/bin/env bash
# GPU session script 3: evaluation throughput through run_eval.sh, stock vs fast, 7B-size random LLaVA saved locally.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 560 python3 benchmarks/e2e/bench_eval.py --preset llava-1.5-7b --models preset --limit 100 --batch 1 8 \
    --out-dir "$OUT/eval" 2>&1 | grep -v Warning | tail -12
