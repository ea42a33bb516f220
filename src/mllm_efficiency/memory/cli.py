"""`mllm-eff quick-start`: the QuickLlama command line (docs/long_context_memory.md, "Command line").

    mllm-eff quick-start --prompt prompts.txt --yaml configs/memory/llama3-qllm-2k.yaml \
        --non-query-aware false --question "What is the pass key?" --record-csv true --model qwen2.5-coder-0.5b

The seed's underscore spellings (`--non_query_aware`, `--record_csv`, ...) are accepted too. Also runnable as
`python -m mllm_efficiency.memory.cli quick-start ...`.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("mllm_efficiency.memory")

CSV_COLUMNS = ["input_tokens", "inference_time_sec", "peak_memory_GB", "tokens_generated",
               "throughput_tokens_per_sec", "query_index", "batch_size", "prefill_time_sec", "decode_time_sec",
               "ttft_sec", "decode_tokens_per_sec", "batch_throughput_tokens_per_sec", "peak_reserved_GB", "gpu_name",
               "gpu_util_mean_pct", "gpu_power_mean_W", "model", "config", "mode", "output_text"]
DEFAULT_QUESTION_RE = r"Question:\s*(.+)"


def _bool(text: str) -> bool:
    v = str(text).strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_commands(sub) -> None:
    from ..cli import _int_at_least

    p = sub.add_parser("quick-start", aliases=["quickllama"],
                       help="run prompt files through a memory method from a YAML config (QuickLlama)")
    p.add_argument("--prompt", required=True, help="prompt file: Python list literal, plain text or JSONL")
    p.add_argument("--yaml", required=True, help="memory config (configs/memory/*.yaml)")
    p.add_argument("--non-query-aware", "--non_query_aware", dest="non_query_aware", type=_bool, default=False,
                   metavar="{true,false}", help="true: no question term (InfLLM); default false (Q-LLM)")
    p.add_argument("--question", default=None, help="the question of every prompt (query-aware mode)")
    p.add_argument("--question-regex", "--question_regex", dest="question_regex", default=DEFAULT_QUESTION_RE,
                   help="regex whose group 1 on the last matching line is the question (default: 'Question: ...')")
    p.add_argument("--record-csv", "--record_csv", dest="record_csv", default="false",
                   help="true: CSV under --out-dir in the course layout; false; or a CSV file path")
    p.add_argument("--legacy-csv", "--legacy_csv", dest="legacy_csv", action="store_true",
                   help="write the course wrapper's CSV layout (one aggregate row, then 'Output i' rows)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens",
                   type=_int_at_least("max_new_tokens", 0), default=None)
    p.add_argument("--model", default=None, help="model alias, GGUF file or HF directory (default: YAML model.path)")
    p.add_argument("--out-dir", "--out_dir", dest="out_dir", default="quick_start_results")
    p.add_argument("--baseline", action="store_true", help="stock model.generate with full attention")
    p.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=_int_at_least("chunk_size", 1),
                   default=None)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the prefill progress bar")
    p.set_defaults(run=run_quick_start)


# ------------------------------------------------------------------ prompt files
def read_prompts(path: str) -> list[dict]:
    """[{"id", "prompt", "question"|None}] from a Python list literal, JSONL or plain text file."""
    from .yaml_config import read_text_file

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompt: file {path!r} does not exist")
    text = read_text_file(p, "--prompt")
    stripped = text.strip()
    if p.suffix == ".jsonl" or (stripped.startswith("{") and "\n{" in stripped):
        rows = []
        for i, line in enumerate(l for l in text.splitlines() if l.strip()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--prompt: line {i + 1} of {path!r} is not JSON: {exc}") from exc
            if not isinstance(row, dict) or "prompt" not in row:
                raise ConfigError(f"--prompt: JSONL row {i} of {path!r} has no 'prompt' field")
            rows.append({"id": row.get("id", i), "prompt": row["prompt"], "question": row.get("question")})
        return rows
    if stripped.startswith("["):
        try:
            items = ast.literal_eval(stripped)
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(f"--prompt: {path!r} looks like a list but is not a Python literal: {exc}") from exc
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"--prompt: {path!r} must be a list of strings")
        return [{"id": i, "prompt": s, "question": None} for i, s in enumerate(items)]
    return [{"id": 0, "prompt": text, "question": None}]


def find_question(prompt: str, pattern: str) -> str | None:
    rx = re.compile(pattern)
    found = None
    for line in prompt.splitlines():
        m = rx.search(line)
        if m:
            found = m.group(1).strip() if m.groups() else m.group(0).strip()
    return found


def render(tokenizer, prompt: str) -> tuple[list[int], bool]:
    """Token ids of a prompt: used as is when already in chat format (assistant header appended if missing),
    else through the tokenizer's chat template when it has one, else plain."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return list(tokenizer(prompt)["input_ids"]), False
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                          add_generation_prompt=True)
    head = probe[: probe.index("x")]
    tail = probe[probe.index("x") + 1:]
    if head and prompt.lstrip().startswith(head.strip()[:8]):
        text = prompt if prompt.rstrip().endswith(tail.strip()) else prompt + tail
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), True


# ------------------------------------------------------------------ GPU sampling
class GpuSampler:
    """Mean GPU utilisation and power at 10 Hz through NVML, when available (else empty values)."""

    def __init__(self):
        self.util, self.power, self.name = [], [], ""
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(self._h)
            self.name = name.decode() if isinstance(name, bytes) else name
        except Exception:
            self._nv = None
            try:
                import torch

                self.name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
            except Exception:
                self.name = ""

    def __enter__(self):
        if self._nv is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.1):
            try:
                self.util.append(self._nv.nvmlDeviceGetUtilizationRates(self._h).gpu)
                self.power.append(self._nv.nvmlDeviceGetPowerUsage(self._h) / 1000.0)
            except Exception:
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    @property
    def util_mean(self):
        return round(sum(self.util) / len(self.util), 2) if self.util else ""

    @property
    def power_mean(self):
        return round(sum(self.power) / len(self.power), 2) if self.power else ""


# ------------------------------------------------------------------ the command
def _load(args, cfg):
    import torch

    from ..zoo import load_model

    name = args.model or cfg.path
    if not name:
        raise ConfigError("--model: no model given (and the YAML has no model.path)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return load_model(name, dtype=dtype, device=device)


def _mode_and_method(cfg, non_query_aware: bool, baseline: bool) -> tuple[str, str | None]:
    if baseline or cfg.method is None:
        return "vanilla", None
    if cfg.method in ("qllm", "infllm"):
        if non_query_aware:
            return "non_query_aware", "infllm"
        if cfg.method == "infllm":
            log.warning("query-aware mode on an inf-llm config: running qllm with its settings")
        return "query_aware", "qllm"
    return ("non_query_aware" if non_query_aware else "query_aware"), cfg.method


def run_quick_start(args, model=None, tokenizer=None) -> int:
    import torch

    import mllm_efficiency as me

    from .search import GreedySearch
    from .yaml_config import load_memory_config

    cfg = load_memory_config(args.yaml)
    rows = read_prompts(args.prompt)
    mode, method = _mode_and_method(cfg, args.non_query_aware, args.baseline)
    questions = []
    for i, row in enumerate(rows):
        q = row["question"] or args.question or find_question(row["prompt"], args.question_regex)
        if method == "qllm" and not q:
            raise ConfigError(f"prompt {i}: no question found (JSONL 'question', --question or --question-regex "
                              f"{args.question_regex!r}); use --non-query-aware true to run without one")
        questions.append(q)
    if model is None:
        model, tokenizer = _load(args, cfg)
    encoded = [render(tokenizer, r["prompt"])[0] for r in rows]
    max_new = args.max_new_tokens if args.max_new_tokens is not None else cfg.max_new_tokens
    chunk = args.chunk_size or cfg.chunk_size
    kwargs = dict(cfg.kwargs)
    handle = None
    if method is not None:
        if method == "infllm" and cfg.method == "qllm":
            kwargs.pop("question_weight", None)
        handle = me.apply(model, method, **kwargs)
    device = next(model.parameters()).device
    with GpuSampler() as gpu:
        try:
            t0 = time.perf_counter()
            if handle is None and args.baseline:
                results = _baseline(model, tokenizer, encoded, max_new)
            else:
                searcher = GreedySearch(model, tokenizer)
                searcher.generate(input_ids=encoded, question=questions if method == "qllm" else None,
                                  max_new_tokens=max_new, chunk_size=chunk, max_len=cfg.max_len,
                                  truncation=cfg.truncation, progress=args.progress)
                results = [(s["new_token_ids"], s) for s in searcher.all_stats]
            batch_time = time.perf_counter() - t0
        finally:
            if handle is not None:
                handle.remove()
    total_new = sum(len(r[0]) for r in results)
    out_rows = []
    for i, (new_ids, st) in enumerate(results):
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        total = st["inference_time_sec"]
        dec = st["decode_time_sec"]
        n = len(new_ids)
        out_rows.append({
            "input_tokens": st["input_tokens"], "inference_time_sec": round(total, 4),
            "peak_memory_GB": _fmt(st.get("peak_memory_GB")), "tokens_generated": n,
            "throughput_tokens_per_sec": round(n / total, 3) if total > 0 else "",
            "query_index": i, "batch_size": len(rows), "prefill_time_sec": round(st["prefill_time_sec"], 4),
            "decode_time_sec": round(dec, 4), "ttft_sec": round(st["ttft_sec"], 4),
            "decode_tokens_per_sec": round(max(n - 1, 0) / dec, 3) if dec > 0 and n > 1 else "",
            "batch_throughput_tokens_per_sec": round(total_new / batch_time, 3) if batch_time > 0 else "",
            "peak_reserved_GB": _fmt(st.get("peak_reserved_GB")), "gpu_name": gpu.name,
            "gpu_util_mean_pct": gpu.util_mean, "gpu_power_mean_W": gpu.power_mean,
            "model": str(args.model or cfg.path), "config": cfg.stem, "mode": mode, "output_text": text})
        print(f"[{i}] ({st['input_tokens']} tokens, {total:.2f} s) {text}")
    target = _csv_target(args, cfg, mode, len(rows), max(r["input_tokens"] for r in out_rows))
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "w", newline="") as f:
            if args.legacy_csv:
                _write_legacy(f, out_rows)
            else:
                w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                w.writeheader()
                w.writerows(out_rows)
        print(f"CSV written: {target}")
    del device
    return 0


def _fmt(v):
    return "" if v is None else round(float(v), 4)


def _csv_target(args, cfg, mode, n, tokens) -> Path | None:
    value = str(args.record_csv).strip()
    if value.lower() in ("false", "0", "no", "", "none"):
        return None
    if value.lower() in ("true", "1", "yes"):
        return (Path(args.out_dir) / f"{mode}_{n}_query" / cfg.stem /
                f"{Path(args.prompt).stem}_input_token_len_{tokens}.csv")
    return Path(value)


def _write_legacy(f, rows) -> None:
    w = csv.writer(f)
    w.writerow(CSV_COLUMNS[:5])
    n = len(rows)
    agg = [max(r["input_tokens"] for r in rows), round(sum(r["inference_time_sec"] for r in rows), 4),
           max((r["peak_memory_GB"] for r in rows if r["peak_memory_GB"] != ""), default=""),
           sum(r["tokens_generated"] for r in rows)]
    agg.append(round(agg[3] / agg[1], 3) if agg[1] else "")
    w.writerow(agg)
    for i in range(n):
        w.writerow([f"Output {i}", rows[i]["output_text"]])


def _baseline(model, tokenizer, encoded, max_new):
    from functools import partial

    import torch

    from ..fast import generate as fast_generate

    device = next(model.parameters()).device
    out = []
    for ids in encoded:
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        x = torch.tensor([ids], device=device)
        # on CUDA the full-attention baseline runs on the fast path (graph prefill + graph decode), as users run it
        generate = partial(fast_generate, model, fast="auto") if cuda else model.generate
        with torch.no_grad():
            first = generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False)
            if cuda:
                torch.cuda.synchronize()
            ttft = time.perf_counter() - t0
            gen = generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - t0 - ttft
        new = gen[0, len(ids):].tolist()
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        n = next((i for i, t in enumerate(new) if t in eos), len(new))
        del first
        out.append((new[:n], {"input_tokens": len(ids), "inference_time_sec": total, "prefill_time_sec": ttft,
                              "decode_time_sec": max(total - ttft, 0.0), "ttft_sec": ttft,
                              "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
                              "peak_reserved_GB": torch.cuda.max_memory_reserved() / 1e9 if cuda else None}))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mllm_efficiency.memory.cli")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ConfigError as e:  # bad value or file: one line, no traceback (as `mllm-eff quick-start`)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
