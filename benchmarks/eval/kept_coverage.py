#!/usr/bin/env python
"""Which image tokens does FastV keep on shapes-vlm? The share of the patches covered by a shape that survive
pruning, for FastV's attention scorers (last_row = the paper's, text_rows, all_rows) and random (same K, same
count), over held-out test scenes.

    PYTHONPATH=src python benchmarks/eval/kept_coverage.py [--weights DIR] [--n 60] [--k 2] [--ratio 0.75]

If FastV kept what the answer needs, its share would clearly exceed random's (= 1 - ratio on average).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import mllm_efficiency as me  # noqa: E402
from mllm_efficiency.eval import shapes_vlm, synthetic  # noqa: E402
from mllm_efficiency.eval.shapes_eval import prompt_of  # noqa: E402


def shape_patches(sample, patch: int) -> torch.Tensor:
    """(n_patches,) bool: the patch holds a pixel of some shape (raster order, as the image tokens)."""
    a = np.asarray(synthetic.render(sample)).astype(int)
    foreground = np.abs(a - np.array(synthetic.BACKGROUND)).sum(-1) > 0
    g = a.shape[0] // patch
    return torch.from_numpy(foreground.reshape(g, patch, g, patch).any(axis=(1, 3)).reshape(-1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="trained-parts dir (default: the package assets)")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.75)
    args = p.parse_args(argv)
    model, proc = shapes_vlm.load_shapes_vlm(args.weights, allow_untrained=False)
    image_id = model.config.image_token_index
    patch = model.config.vision_config.patch_size
    shape_share = []
    for scorer in ("last_row", "text_rows", "all_rows", "random"):
        kept_share = []
        for i in range(args.n):
            s = synthetic.make_sample(i, 0, "test")
            enc = proc(images=[synthetic.render(s)], text=prompt_of(proc, s), return_tensors="pt")
            handle = me.apply(model, "fastv", k=args.k, ratio=args.ratio, scorer=scorer)
            try:
                with torch.no_grad():
                    model(**enc)
                kept = handle.stats.kept_visual_mask[0][enc["input_ids"][0] == image_id]
            finally:
                handle.remove()
            shapes = shape_patches(s, patch)
            kept_share.append((kept & shapes).sum().item() / max(1, shapes.sum().item()))
            shape_share.append(shapes.float().mean().item())
        print(f"{scorer:10s}: {np.mean(kept_share):.3f} of the shape patches kept (K={args.k}, R={args.ratio}, "
              f"{args.n} scenes; shapes cover {np.mean(shape_share):.3f} of the patches)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
