#!/usr/bin/env bash
# GPU call B: the CUDA-graph tests (FastV mask mode diagnosed if it fails), e2e with the compiled step.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_generate.py -k "cuda_graph" > "$OUT/cuda_tests.log" 2>&1; then
  grep -E "^E  |passed|failed" "$OUT/cuda_tests.log" | head -12
  timeout 60 python3 benchmarks/e2e/diag_mask.py cuda 2>&1 | grep -E "DIFF|prefill graph" | head -12
fi
tail -1 "$OUT/cuda_tests.log"
timeout 300 python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --compile --sections prefill e2e --e2e 1:32 \
    --repeats 4 --out-dir "$OUT/e2e_compile" 2>&1 | tail -22
