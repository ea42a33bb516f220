"""Direct (no lmms-eval) scoring of a LLaVA-format model on the synthetic shapes questions: used by the training
script for held-out accuracy and by benchmarks/eval for accuracy-vs-ratio sweeps."""
from __future__ import annotations

from collections import defaultdict

import torch

from . import synthetic


def prompt_of(processor, sample: synthetic.Sample) -> str:
    content = [{"type": "image"}] * sample.frames + [{"type": "text", "text": synthetic.prompt_text(sample)}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@torch.no_grad()
def answer(model, processor, samples, max_new_tokens: int = 3, device=None) -> list[str]:
    """Greedy replies for a batch of samples (left padding)."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    device = device or next(model.parameters()).device
    images = [im for s in samples for im in synthetic.render_frames(s)]
    enc = processor(images=images, text=[prompt_of(processor, s) for s in samples], return_tensors="pt",
                    padding=len(samples) > 1).to(device)
    enc["pixel_values"] = enc["pixel_values"].to(next(model.model.vision_tower.parameters()).dtype)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return [tok.decode(row, skip_special_tokens=True) for row in out[:, enc["input_ids"].shape[1]:]]


def accuracy(model, processor, samples, batch_size: int = 16, device=None) -> dict:
    """Exact-match accuracy overall ("all") and per question type."""
    was_training = model.training
    model.eval()
    hits, totals = defaultdict(float), defaultdict(int)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        for s, reply in zip(chunk, answer(model, processor, chunk, device=device)):
            hits[s.qtype] += synthetic.exact_match(reply, s.answer)
            totals[s.qtype] += 1
    model.train(was_training)
    acc = {q: hits[q] / totals[q] for q in sorted(totals)}
    acc["all"] = sum(hits.values()) / max(1, sum(totals.values()))
    return acc
