#!/usr/bin/env bash
# GPU session script 2: the failing CUDA-graph test in detail, the e2e table with the compiled decode step, and
# the decode attention variants at 32k on a GQA model.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_generate.py -k cuda_graph 2>&1 | grep -E "^E |passed|failed" | head -30
timeout 240 python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --compile --sections e2e --e2e 1:32 \
    --out-dir "$OUT/e2e_compile" 2>&1 | tail -22
timeout 150 python3 benchmarks/e2e/decode_attention.py --preset llama-3-8b --context 32768 --json "$OUT/attn.json" 2>&1 | tail -8
