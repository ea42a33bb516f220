"""Small, generic timing helpers shared by the benchmarks.

- :func:`time_cuda` times a callable with CUDA events (host-synchronised before and after every sample),
  or with ``time.perf_counter`` when no CUDA device is involved.
- :func:`peak_memory` reports the CUDA allocator's peak while a callable runs (None on CPU).
- :func:`markdown_table` renders rows of dicts as a GitHub markdown table.
- :func:`environment_info` records library versions and the device, for result files.

Nothing here knows about any method; the ``mllm-eff bench`` harness builds on these.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "TimingResult",
    "MemoryResult",
    "time_cuda",
    "peak_memory",
    "percentile",
    "markdown_table",
    "environment_info",
    "uses_cuda",
    "synchronize",
]

GIB = float(1 << 30)


# --------------------------------------------------------------------------------------------- devices
def uses_cuda(device: Any = None) -> bool:
    """True if timing should use CUDA events: `device` is a CUDA device, or None and CUDA is available."""
    if not torch.cuda.is_available():
        return False
    if device is None:
        return True
    return torch.device(device).type == "cuda"


def synchronize(device: Any = None) -> None:
    """Wait for all queued work on `device` (no-op on CPU)."""
    if uses_cuda(device):
        torch.cuda.synchronize(None if device is None else torch.device(device))


# --------------------------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


@dataclasses.dataclass
class TimingResult:
    """Per-call times in milliseconds (warm-up calls excluded)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: list[float]
    clock: str = "cuda_event"  # "cuda_event" or "perf_counter"
    wall_median_ms: float | None = None  # host wall clock around each synchronised call

    @classmethod
    def from_samples(cls, samples: Sequence[float], clock: str, wall: Sequence[float] | None = None) -> "TimingResult":
        samples = [float(s) for s in samples]
        return cls(median_ms=statistics.median(samples) if samples else math.nan,
                   p10_ms=percentile(samples, 10), p90_ms=percentile(samples, 90), samples=samples, clock=clock,
                   wall_median_ms=statistics.median(wall) if wall else None)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan

    @property
    def min_ms(self) -> float:
        return min(self.samples) if self.samples else math.nan

    def fmt(self, digits: int = 1) -> str:
        """'145.2 [144.8–146.0]': median [p10–p90]."""
        return f"{self.median_ms:.{digits}f} [{self.p10_ms:.{digits}f}–{self.p90_ms:.{digits}f}]"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mean_ms"] = self.mean_ms
        d["min_ms"] = self.min_ms
        return d


def time_cuda(fn: Callable[..., Any], warmup: int = 3, repeats: int = 10, *, device: Any = None,
              setup: Callable[[], Any] | None = None, min_time_s: float = 0.0,
              max_repeats: int = 200) -> TimingResult:
    """Time `fn` `repeats` times after `warmup` untimed calls.

    On CUDA each sample is the elapsed time between two CUDA events recorded around the call, with the
    device synchronised before the start event (empty queue) and after the end event; this includes host
    launch latency when the call is launch-bound. On CPU (`device` of type cpu, or no CUDA) the host clock
    is used. If `setup` is given it runs untimed before every call and its result is passed to `fn`
    (e.g. a prefill whose cache a decode loop then extends). Results of `fn` are dropped immediately.
    With `min_time_s > 0` (and at least one warm-up call) the number of timed calls is raised so that they
    take about `min_time_s` in total, judged from the last warm-up call, up to `max_repeats`: short, noisy
    (launch-bound) calls get more samples.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    cuda = uses_cuda(device)
    samples: list[float] = []
    wall: list[float] = []
    total = warmup + repeats
    i = 0
    while i < total:
        arg = setup() if setup is not None else None
        call = (lambda: fn(arg)) if setup is not None else fn
        if cuda:
            synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            call()
            end.record()
            end.synchronize()
            t1 = time.perf_counter()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            ms = (t1 - t0) * 1e3
        del arg
        if i >= warmup:
            samples.append(ms)
            wall.append((t1 - t0) * 1e3)
        elif i == warmup - 1 and min_time_s > 0 and ms > 0:
            wanted = math.ceil(min_time_s * 1e3 / ms)
            total = warmup + max(repeats, min(wanted, max(max_repeats, repeats)))
        i += 1
    return TimingResult.from_samples(samples, "cuda_event" if cuda else "perf_counter", wall)


# --------------------------------------------------------------------------------------------- memory
@dataclasses.dataclass
class MemoryResult:
    """CUDA allocator statistics around one call, in bytes."""

    peak_bytes: int  # max_memory_allocated during the call
    baseline_bytes: int  # memory_allocated just before the call (weights and anything else alive)

    @property
    def extra_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def extra_gib(self) -> float:
        return self.extra_bytes / GIB

    def as_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "baseline_bytes": self.baseline_bytes,
                "extra_bytes": self.extra_bytes, "peak_gib": self.peak_gib, "extra_gib": self.extra_gib}


def peak_memory(fn: Callable[[], Any], device: Any = None) -> MemoryResult | None:
    """Peak CUDA memory allocated while `fn()` runs (the result of `fn` is dropped); None without CUDA."""
    if not uses_cuda(device):
        return None
    dev = None if device is None else torch.device(device)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(dev)
    del out
    return MemoryResult(peak_bytes=int(peak), baseline_bytes=int(base))


# --------------------------------------------------------------------------------------------- tables
def _cell(value: Any, float_digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        text = f"{value:.{float_digits}f}"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Any], columns: Sequence[Any], float_digits: int = 2) -> str:
    """A GitHub markdown table.

    `columns` items are keys, or `(key, header)` pairs. A row is a dict (missing keys print as empty
    cells) or a sequence in column order. None and NaN print as "n/a", floats with `float_digits`.
    """
    keys, headers = [], []
    for col in columns:
        if isinstance(col, (tuple, list)):
            keys.append(col[0])
            headers.append(str(col[1]))
        else:
            keys.append(col)
            headers.append(str(col))
    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if isinstance(row, dict):
            cells = [_cell(row[k], float_digits) if k in row else "" for k in keys]
        else:
            vals = list(row)
            cells = [_cell(vals[i], float_digits) if i < len(vals) else "" for i in range(len(keys))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- environment
def environment_info(device: Any = None) -> dict:
    """Versions and device description for result files."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover - transformers is a hard dependency of the package
        info["transformers"] = None
    try:
        from mllm_efficiency import __version__ as me_version

        info["mllm_efficiency"] = me_version
    except Exception:
        info["mllm_efficiency"] = None
    if uses_cuda(device):
        dev = torch.device(device) if device is not None else torch.device("cuda")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=props.total_memory / GIB,
                    compute_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    return info
