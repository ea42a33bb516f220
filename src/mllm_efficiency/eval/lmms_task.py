"""The lmms-eval hooks of the synthetic shapes tasks (the task folder's utils.py re-exports these)."""
from __future__ import annotations

from . import synthetic


def doc_to_visual(doc: dict) -> list:
    sample = synthetic.Sample.from_json(doc)
    return synthetic.render_frames(sample)


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return synthetic.prompt_text(synthetic.Sample.from_json(doc))


def process_results(doc: dict, results: list) -> dict:
    return {"exact_match": synthetic.exact_match(results[0] if results else "", doc["answer"])}
