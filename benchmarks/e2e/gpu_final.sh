#!/usr/bin/env bash
# One GPU call (device time was short): CUDA-graph test details, e2e with the compiled decode step, and a small
# evaluation-throughput run through run_eval.sh.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 20 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_generate.py -k "cuda_graph and fastv" 2>&1 | grep -E "^E  |passed|failed" | head -12
timeout 130 python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --compile --sections e2e --e2e 1:32 \
    --repeats 6 --out-dir "$OUT/e2e_compile" 2>&1 | tail -7
timeout 150 python3 benchmarks/e2e/bench_eval.py --preset llava-1.5-7b --models preset --limit 24 --batch 8 --methods fastv \
    --out-dir "$OUT/eval" 2>&1 | grep -v Warning | tail -6
