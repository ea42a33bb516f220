#!/usr/bin/env bash
# GPU call 1: GGUF piece 0, the FastV mask-mode diagnosis, the CUDA-graph tests, e2e with the compiled decode step.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash .stage/smollm2/append.sh 0 | tail -1; bash .stage/install_wheels.sh .stage/wheels
nvidia-smi --query-gpu=name --format=csv,noheader; python3 --version
pip list 2>/dev/null | tr -s " " | cut -d" " -f1,2 | tr "\n" ";" > $OUT/piplist.txt
timeout 80 python3 benchmarks/e2e/diag_mask.py cuda 2>&1 | grep -v Warn | grep -E "DIFF|same|prefill|Error" | head -40
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_generate.py -k "cuda_graph" 2>&1 | grep -E "^E  |passed|failed|Error" | head -20
timeout 330 python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --compile --sections prefill e2e \
    --repeats 5 --out-dir "$OUT/e2e_compile" 2>&1 | tail -30
