#!/usr/bin/env bash
# The smallest useful GPU call: the FastV CUDA-graph test details and e2e 1x576/32 tokens with the compiled step.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 20 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_generate.py -k "cuda_graph and fastv" 2>&1 | grep -E "^E  |passed|failed" | head -12
timeout 125 python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --compile --sections e2e --e2e 1:32 \
    --repeats 4 --out-dir "$OUT/e2e_compile" 2>&1 | tail -7
