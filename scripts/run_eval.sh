#!/usr/bin/env bash
# Evaluate a model + method with lmms-eval (through the mllm_efficiency plugin), from the repo root:
#   bash scripts/run_eval.sh TASK MODEL METHOD RATIO [extra lmms-eval args: --limit N --log_samples --output_path P ...]
#   bash scripts/run_eval.sh                      # offline embedded default: shapes_vqa on shapes-vlm, vanilla + FastV
# RATIO = fraction of tokens REMOVED, in [0, 1) (kept fraction = 1 - RATIO; the seed scripts' RATIO meant "kept").
# Results: results/<task>/<model>/<method>[-<method_args>]_<ratio>/ (e.g. fastv-k2_0.75);
# summary table: mllm-eff report results/<task>/<model>
# Multi-GPU (one process per GPU): MLLM_EFF_LAUNCHER="accelerate launch --num_processes 4" bash scripts/run_eval.sh ...
# Errors (bad argument, missing model, unknown method) print one `error: ...` line and exit 2 before lmms-eval starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:${PYTHONPATH}}"
PY="${PYTHON:-python}"
exec "$PY" -m mllm_efficiency.eval.cli eval "$@"
