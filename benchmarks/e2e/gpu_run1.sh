#!/usr/bin/env bash
# GPU session script (run from the repo root on the GPU machine): fast-path tests, the e2e table, the GQA decode step.
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_generate.py tests/test_fast_decode.py 2>&1 | tail -15
timeout 300 python3 benchmarks/e2e/bench_e2e.py --preset llava-1.5-7b --device cuda --out-dir "$OUT/e2e" 2>&1 | tail -45
timeout 120 python3 -m mllm_efficiency.cli bench --model llama-3-8b --context 32768 --methods vanilla snapkv:ratio=0.9 \
    --decode fast --new-tokens 32 --repeats 2 --warmup 1 --out "$OUT/gqa" 2>&1 | tail -8
