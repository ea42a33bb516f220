"""Evaluation helpers that run offline: generated long-context tasks with standard scoring (`longctx`)."""
from .longctx import (
    DEFAULT_MAX_NEW_TOKENS,
    PLACEMENTS,
    TASKS,
    Sample,
    TaskResult,
    check_method,
    make_sample,
    make_samples,
    rouge1_f,
    run_samples,
    run_task,
    score,
    score_kv_retrieval,
    score_niah,
    score_number_string,
    score_is_final,
    score_passkey,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "PLACEMENTS", "TASKS", "Sample", "TaskResult", "check_method", "make_sample",
    "make_samples", "rouge1_f", "run_samples", "run_task", "score", "score_kv_retrieval", "score_niah",
    "score_number_string", "score_passkey", "score_is_final",
]
