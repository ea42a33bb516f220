#!/usr/bin/env python
"""Focus vs FrameFusion at equal accuracy: from a shapes_video sweep (benchmarks/eval/video_sweep.py), the budget
(ratio) of each method that reaches the same score, and the command that times those two budgets on the
LLaVA-Video-7B-size shape in one run (bench_video.py --ratio-arms).

    python benchmarks/video/equal_accuracy.py OUT/video_sweep/results.json            # prints the pair + command
    python benchmarks/video/equal_accuracy.py OUT/video_sweep/results.json --run --out $OUT/equal_acc   # and runs it

Target score: `--target`, else the lower of the two methods' accuracies at `--at` (default R = 0.75). That method's
budget is then `--at` itself; the other's is the largest ratio whose accuracy, linearly interpolated between the
measured ratios (vanilla = ratio 0), is still >= the target. When even its largest measured ratio scores above
the target, that ratio is used and the note says the budget is a lower bound (no extrapolation). The ratio is the
layer-averaged share of the visual tokens removed, which each method maps onto the 7B shape itself
(docs/video.md "RATIO"), so the budget transfers as a number; the accuracies come from the small model.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def curve(rows: list[dict], method: str) -> list[tuple[float, float]]:
    """(ratio, accuracy) of `method`, with vanilla at ratio 0, sorted by ratio."""
    pts = {0.0: r["acc_all"] for r in rows if r["method"] == "vanilla"}
    pts.update({float(r["ratio"]): float(r["acc_all"]) for r in rows if r["method"] == method})
    if len(pts) < 2:
        raise SystemExit(f"error: the sweep has no {method} rows")
    return sorted(pts.items())


def accuracy_at(points: list[tuple[float, float]], ratio: float) -> float:
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if r0 <= ratio <= r1:
            return a0 + (a1 - a0) * (ratio - r0) / (r1 - r0) if r1 > r0 else a1
    raise SystemExit(f"error: ratio {ratio} is outside the measured ratios {[r for r, _ in points]}")


def budget_for(points: list[tuple[float, float]], target: float) -> tuple[float, str | None]:
    """The largest ratio whose interpolated accuracy is >= target (and a note when it is a bound)."""
    if points[-1][1] >= target:
        return points[-1][0], (f"accuracy {points[-1][1]:.3f} at the largest measured ratio {points[-1][0]:g} is "
                               "still >= the target: the budget is a lower bound")
    best = None
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a0 >= target > a1:  # a crossing inside this segment
            best = r0 + (a0 - target) / (a0 - a1) * (r1 - r0)
    if best is None:
        return points[0][0], f"no measured ratio reaches the target {target:.3f}"
    return best, None


def plan(rows: list[dict], target: float | None = None, at: float = 0.75, methods=("focus", "framefusion")) -> dict:
    curves = {m: curve(rows, m) for m in methods}
    if target is None:
        target = min(accuracy_at(c, at) for c in curves.values())
    out = {"target_accuracy": target, "at": at, "methods": {}}
    for m, c in curves.items():
        r, note = budget_for(c, target)
        out["methods"][m] = {"ratio": round(r, 3), "accuracy_at_ratio": round(accuracy_at(c, r), 4),
                             "curve": c, "note": note}
    return out


def command(p: dict, frames: int, out: str, fast: bool) -> list[str]:
    focus_key = "focus_fast" if fast else "focus"
    return [sys.executable, str(HERE / "bench_video.py"), "--frames", str(frames), "--arms", "dense",
            "--ratio-arms", f"{focus_key}={p['methods']['focus']['ratio']:g}",
            f"framefusion={p['methods']['framefusion']['ratio']:g}", "--out", out]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="results.json of benchmarks/eval/video_sweep.py")
    ap.add_argument("--target", type=float, default=None, help="accuracy both budgets must reach")
    ap.add_argument("--at", type=float, default=0.75, help="default target: the lower accuracy at this ratio")
    ap.add_argument("--frames", type=int, default=64, help="frames of the 7B-size timing run")
    ap.add_argument("--slow-focus", action="store_true", help="time Focus SEC alone, not its GPU fast path")
    ap.add_argument("--out", default="/tmp/equal_acc", help="--out of the timing run (and of equal_accuracy.json)")
    ap.add_argument("--run", action="store_true", help="run the timing command now (GPU: ~1 min)")
    ap.add_argument("--bench-args", default="", help="extra bench_video.py arguments, e.g. '--tiny' (CPU smoke run)")
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.sweep).read_text())["rows"]
    p = plan(rows, args.target, args.at)
    cmd = command(p, args.frames, args.out, not args.slow_focus) + shlex.split(args.bench_args)
    p["command"] = shlex.join(cmd)
    for m, v in p["methods"].items():
        print(f"{m}: ratio {v['ratio']:g} reaches {v['accuracy_at_ratio']:.3f} (target {p['target_accuracy']:.3f})"
              + (f"; {v['note']}" if v["note"] else ""))
    print(p["command"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "equal_accuracy.json").write_text(json.dumps(p, indent=1))
    if args.run:
        return subprocess.call(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
