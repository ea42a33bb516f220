#!/usr/bin/env bash
# One GPU call (device time was short): CUDA-graph test details, e2e with the compiled decode step, the decode
# attention variants on a GQA model at 32k, and a small evaluation-throughput run through run_eval.sh.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 40 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_generate.py -k cuda_graph 2>&1 | grep -E "^E  |passed|failed" | head -12
timeout 150 python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --compile --sections e2e --e2e 1:32 \
    --out-dir "$OUT/e2e_compile" 2>&1 | tail -8
timeout 80 python3 benchmarks/e2e/decode_attention.py --preset llama-3-8b --context 32768 --json "$OUT/attn.json" 2>&1 | tail -6
timeout 220 python3 benchmarks/e2e/bench_eval.py --preset llava-1.5-7b --models preset --limit 32 --batch 8 \
    --out-dir "$OUT/eval" 2>&1 | grep -v Warning | tail -6
