#!/usr/bin/env bash
# Evaluate a model + method with lmms-eval (through the mllm_efficiency plugin), from the repo root:
#   bash scripts/run_eval.sh TASK MODEL METHOD RATIO [extra lmms-eval args: --limit N --log_samples --output_path P ...]
#   bash scripts/run_eval.sh                      # offline embedded default: shapes_vqa on shapes-vlm, vanilla + FastV
# RATIO = fraction of tokens REMOVED, in [0, 1) (kept fraction = 1 - RATIO; the seed scripts' RATIO meant "kept").
# Results: results/<task>/<model>/<method>_<ratio>/ ; summary table: mllm-eff report results/<task>/<model>
# Multi-GPU: MLLM_EFF_LAUNCHER="accelerate launch --num_processes 4" bash scripts/run_eval.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:${PYTHONPATH}}"
PY="${PYTHON:-python}"
if [ "$#" -gt 0 ] && [ "$#" -lt 4 ]; then
  echo "usage: bash scripts/run_eval.sh TASK MODEL METHOD RATIO [extra lmms-eval args]  (or no arguments)" >&2
  exit 2
fi
exec "$PY" -m mllm_efficiency.eval.cli eval "$@"
