#!/usr/bin/env python3
"""Prefill time and peak GPU memory of the block-memory methods at 128k tokens, against full attention.

An 8B-size random-weight Llama (`mllm_efficiency.bench.presets`, preset `llama-3-8b`; values do not matter
for time and memory) is built directly on the GPU in bf16. For every length and method, one random-token
prompt is prefilled and the first token produced:

  qllm, infllm   the memory YAML (default configs/memory/llama3-qllm-2k.yaml: n_init 128, n_local 1024,
                 block 128, topk 8, exc 512, chunk 8192; infllm = the same file with `type: inf-llm`, i.e. the
                 same 2k window), attached with `patch_hf`; the prompt goes through the package's own
                 generation path `GreedySearch.generate(max_new_tokens=1, chunk_size=<YAML chunk_size>)`:
                 chunked prefill (logits of the last position only) + the first greedy token. Q-LLM's question
                 is given as explicit token ids: `question_span` = the last `--question-tokens` tokens of the
                 prompt (a span after the first chunk is built by the package's probe: one full-attention
                 pass over the question; `--question-at start` puts it at the start instead, inside the first
                 chunk). The question work is inside the timed region.
  streamingllm, lm_infinite   optional, the same YAML with the type switched.
  full           the stock model (SDPA), one forward over the whole prompt with `use_cache=True` and
                 `logits_to_keep=1` (no 128k x vocab logits), then the argmax; CUDA OOM is recorded as "OOM".

Timing: torch.cuda.synchronize() around the call, wall clock; peak = torch.cuda.max_memory_allocated() after
reset_peak_memory_stats() (weights included). `prefill s` = the prefill (GreedySearch's own synchronised
prefill time for the memory methods, the forward for full), `first token s` = the whole call up to the first
token's id. Every method is warmed up once at `--warmup-length` tokens before it is timed.

GPU (H200, measured: ~75 s in total including imports; at 128k qllm 20.3 s / 20.3 GiB, infllm 22.7 s / 20.3 GiB,
full 11.8 s / 45.6 GiB; results in benchmarks/memory/scale/):
  PYTHONPATH=src python3 benchmarks/memory/bench_scale.py --out benchmarks/memory/scale
  PYTHONPATH=src python3 benchmarks/memory/bench_scale.py --lengths 32768 65536 131072 --out /tmp/scale
CPU smoke (tiny model, 2k tokens, small window; < 1 min on 2 cores, numbers meaningless):
  PYTHONPATH=src python3 benchmarks/memory/bench_scale.py --tiny --out /tmp/scale_tiny
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from mllm_efficiency.bench.presets import PRESETS, build_preset  # noqa: E402
from mllm_efficiency.bench.specs import parse_value  # noqa: E402
from mllm_efficiency.bench.report import jsonable  # noqa: E402
from mllm_efficiency.bench.timing import environment_info  # noqa: E402
from mllm_efficiency.memory import GreedySearch, load_memory_config, patch_hf  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# method name -> YAML `type` (None = full attention, stock model)
METHOD_TYPES = {"qllm": "qllm", "infllm": "inf-llm", "streamingllm": "stream-llm", "lm_infinite": "infinite-lm",
                "full": None}
DEFAULT_YAML = "configs/memory/llama3-qllm-2k.yaml"
ACCEPT_LENGTH, ACCEPT_S, ACCEPT_GB = 131072, 30.0, 30.0
# --tiny: a small window so that a 2k prompt forms blocks, retrieves and evicts like 128k does at the 2k window
TINY_OVERRIDES = dict(n_init=16, n_local=128, block_size=32, topk=4, repr_topk=2, max_cached_block=8,
                      exc_block_size=64)
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt tokens (default 131072)")
    p.add_argument("--methods", nargs="+", default=None, choices=sorted(METHOD_TYPES),
                   help="default: qllm infllm full")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default llama-3-8b (tiny-llama)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 (fp32 with --tiny)")
    p.add_argument("--yaml", default=str(REPO / DEFAULT_YAML), help="memory YAML (window settings, chunk_size)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override model.<KEY> of the YAML, e.g. pin_memory=true offload=gpu")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill chunk (default: the YAML's chunk_size)")
    p.add_argument("--question-tokens", type=int, default=32, help="Q-LLM question length in tokens")
    p.add_argument("--question-at", choices=["end", "start"], default="end",
                   help="where the question tokens sit in the prompt (end: the last N tokens)")
    p.add_argument("--warmup-length", type=int, default=None, help="untimed run per method (default 4096; 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny-llama, fp32, 2048 tokens, chunk 512, a 256-token window")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.lengths = args.lengths or ([2048] if tiny else [ACCEPT_LENGTH])
    args.methods = args.methods or ["qllm", "infllm", "full"]
    args.preset = args.preset or ("tiny-llama" if tiny else "llama-3-8b")
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.dtype = args.dtype or ("fp32" if tiny else "bf16")
    args.warmup_length = args.warmup_length if args.warmup_length is not None else (256 if tiny else 4096)
    if tiny:
        args.chunk_size = args.chunk_size or 512
        args.question_tokens = min(args.question_tokens, 16)
    return args


def memory_config(args, method: str):
    over = dict(TINY_OVERRIDES) if args.tiny else {}
    for item in args.overrides:
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        over[key.strip()] = parse_value(val.strip())
    over["type"] = METHOD_TYPES[method]
    return load_memory_config(args.yaml, **over)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed + n)
    return torch.randint(3, vocab, (n,), generator=g)


class ChunkProgress:
    """Prints one line per prefill chunk (top-level forward pre-hook; no device sync, so timing is unaffected)."""

    def __init__(self, model, label: str, n_chunks: int):
        self.label, self.n, self.i, self.t0 = label, n_chunks, 0, time.perf_counter()
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.i += 1
        if self.i <= self.n:
            print(f"    {self.label}: chunk {self.i}/{self.n} started at {time.perf_counter() - self.t0:6.1f} s",
                  flush=True)

    def remove(self):
        self.handle.remove()


def run_memory(model, ids: torch.Tensor, cfg, chunk_size: int, args, device, label: str | None) -> dict:
    """Prefill + first token through GreedySearch with the memory method of `cfg` attached."""
    n = ids.numel()
    ids_list = ids.tolist()
    span = None
    if cfg.method_config.query_aware:
        nq = min(args.question_tokens, n)
        span = (n - nq, n) if args.question_at == "end" else (0, nq)
    patch_hf(model, cfg.type, cfg.model)
    handle = model.memory_handle
    searcher = GreedySearch(model, None)
    progress = ChunkProgress(model, label, -(-n // chunk_size)) if label else None
    try:
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        searcher.generate(input_ids=ids_list, question_span=span, max_new_tokens=1, chunk_size=chunk_size)
        sync(device)
        first_token_s = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        st = searcher.last_stats
        mem = st.get("memory", {})
        store_bytes = _store_bytes(model, handle.config, mem)
        row = {"prefill_s": st["prefill_time_sec"], "first_token_s": first_token_s, "peak_bytes": peak,
               "first_token": st["new_token_ids"][0] if st["new_token_ids"] else None, "chunks": st["chunks"],
               "question_source": st.get("question_source"), "blocks": mem.get("blocks"),
               "blocks_loaded": mem.get("loads"), "retrievals": mem.get("retrievals"),
               "cache_hit_rate": mem.get("cache_hit_rate"), "offloaded_bytes": store_bytes}
        return row
    finally:
        if progress is not None:
            progress.remove()
        searcher.clear()
        del searcher
        patch_hf(model, "origin")  # removes the method: the stock model again


def _store_bytes(model, cfg, mem: dict):
    """Bytes of K/V held in memory blocks (on CPU with offload=cpu), summed over layers."""
    blocks = mem.get("blocks")
    if blocks is None:
        return None
    c = model.config
    hkv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(blocks * 2 * hkv * cfg.block_size * head_dim * next(model.parameters()).element_size())


def run_full(model, ids: torch.Tensor, device) -> dict:
    """Stock model (SDPA): one forward over the prompt (KV cache kept, last-position logits) + argmax."""
    x = ids.to(device)[None]
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        sync(device)
        prefill_s = time.perf_counter() - t0
        tok = int(out.logits[0, -1].argmax())
    sync(device)
    first_token_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del out
    return {"prefill_s": prefill_s, "first_token_s": first_token_s, "peak_bytes": peak, "first_token": tok,
            "chunks": 1}


def measure(model, method: str, n: int, args, device, label: str | None) -> dict:
    ids = random_ids(n, model.config.vocab_size, args.seed)
    row: dict = {"method": method, "length": n}
    oom = None
    try:
        if METHOD_TYPES[method] is None:
            row.update(run_full(model, ids, device))
        else:
            cfg = memory_config(args, method)
            row.update(run_memory(model, ids, cfg, args.chunk_size or cfg.chunk_size, args, device, label))
    except torch.cuda.OutOfMemoryError as exc:  # recorded, not raised: the table says OOM
        oom = str(exc).splitlines()[0][:200]
    if oom is not None:
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        row.update(status="OOM", error=oom, peak_bytes=peak)
    else:
        row["status"] = "ok"
        row["prefill_tokens_per_s"] = n / row["prefill_s"] if row["prefill_s"] else None
    free(device)
    return row


def acceptance(rows) -> dict:
    """128k prefill < 30 s and peak < 30 GB (1e9 bytes), for every memory method timed at 131072 tokens."""
    checks = []
    for r in rows:
        if r["length"] != ACCEPT_LENGTH or METHOD_TYPES[r["method"]] is None:
            continue
        ok = (r["status"] == "ok" and r["prefill_s"] < ACCEPT_S and r["peak_bytes"] is not None
              and r["peak_bytes"] / 1e9 < ACCEPT_GB)
        checks.append({"method": r["method"], "pass": bool(ok), "prefill_s": r.get("prefill_s"),
                       "peak_GB": None if r.get("peak_bytes") is None else r["peak_bytes"] / 1e9,
                       "status": r["status"]})
    line = f"Acceptance \"128k prefill < {ACCEPT_S:.0f} s and peak < {ACCEPT_GB:.0f} GB\": "
    if not checks:
        line += "not evaluated (no memory method timed at 131072 tokens on a GPU)"
    else:
        parts = []
        for c in checks:
            if c["status"] != "ok":
                parts.append(f"{c['method']} FAIL ({c['status']})")
            else:
                gb = "n/a" if c["peak_GB"] is None else f"{c['peak_GB']:.1f} GB"
                parts.append(f"{c['method']} {'PASS' if c['pass'] else 'FAIL'} ({c['prefill_s']:.1f} s, {gb})")
        line += "; ".join(parts)
    return {"line": line, "checks": checks, "all_pass": bool(checks) and all(c["pass"] for c in checks)}


def render(result) -> str:
    env = result["environment"]
    dev = env.get("gpu") or env.get("cpu") or "cpu"
    lines = [f"## Prefill at scale: {result['preset']} ({result['dtype']}, random weights, random tokens)", "",
             f"- device: {dev}; torch {env.get('torch')}, transformers {env.get('transformers')}",
             f"- memory YAML: `{result['yaml']}` (chunk {result['chunk_size']}; {result['window']}); "
             f"infllm = same file with `type: inf-llm`; Q-LLM question = {result['question']}",
             "- full = stock model, SDPA, one forward with `logits_to_keep=1`",
             f"- command: `{result['command']}`", "",
             "| method | length | prefill s | first token s | peak GiB | prefill tok/s | offloaded GiB | blocks/layer "
             "| cache hit rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['length']} | {r['status']} | {r['status']} | "
                         f"{_gib(r.get('peak_bytes'))} | - | - | - | - |")
            continue
        layers = result["num_layers"]
        blocks = r.get("blocks")
        lines.append(f"| {r['method']} | {r['length']} | {r['prefill_s']:.2f} | {r['first_token_s']:.2f} | "
                     f"{_gib(r.get('peak_bytes'))} | {r['prefill_tokens_per_s']:,.0f} | "
                     f"{_gib(r.get('offloaded_bytes'))} | {'-' if blocks is None else blocks // layers} | "
                     f"{'-' if r.get('cache_hit_rate') is None else format(r['cache_hit_rate'], '.2f')} |")
    lines += ["", result["acceptance"]["line"], "", f"Total run time: {result['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _gib(v) -> str:
    return "-" if v is None else f"{v / GIB:.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: threads only add contention on a small shared CPU
    t_start = time.perf_counter()
    print(f"building {args.preset} ({args.dtype}) on {device} ...", flush=True)
    model = build_preset(args.preset, device, dtype, attn="sdpa", seed=args.seed)
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built in {time.perf_counter() - t_start:.1f} s: {n_params / 1e9:.2f}B parameters, "
          f"{model.config.num_hidden_layers} layers", flush=True)
    ref_cfg = memory_config(args, "qllm")
    chunk = args.chunk_size or ref_cfg.chunk_size
    mk = ref_cfg.kwargs
    window = (f"n_init {mk.get('n_init')}, n_local {mk.get('n_local')}, block {mk.get('block_size')}, topk "
              f"{mk.get('topk')}, exc {mk.get('exc_block_size')}, repr_topk {mk.get('repr_topk')}, cache "
              f"{mk.get('max_cached_block')}, beta {mk.get('question_weight')}")
    print(f"memory: {window}; chunk {chunk}", flush=True)
    rows = []
    for method in args.methods:
        if args.warmup_length:
            t = time.perf_counter()
            w = measure(model, method, args.warmup_length, args, device, None)
            print(f"[{time.perf_counter() - t_start:6.1f} s] warm-up {method} at {args.warmup_length}: "
                  f"{w['status']} in {time.perf_counter() - t:.1f} s", flush=True)
        for n in args.lengths:
            print(f"[{time.perf_counter() - t_start:6.1f} s] {method} at {n} tokens ...", flush=True)
            r = measure(model, method, n, args, device, f"{method} {n}")
            rows.append(r)
            if r["status"] == "ok":
                print(f"[{time.perf_counter() - t_start:6.1f} s] {method:12s} {n:7d}: prefill {r['prefill_s']:7.2f} s"
                      f"  first token {r['first_token_s']:7.2f} s  peak {_gib(r['peak_bytes'])} GiB  "
                      f"{r['prefill_tokens_per_s']:9,.0f} tok/s", flush=True)
            else:
                print(f"[{time.perf_counter() - t_start:6.1f} s] {method:12s} {n:7d}: {r['status']} "
                      f"({r.get('error')})", flush=True)
    if args.question_at == "end":
        question = f"the last {args.question_tokens} prompt tokens (question_span)"
    else:
        question = f"the first {args.question_tokens} prompt tokens (question_span)"
    result = {"command": "PYTHONPATH=src python3 " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
              "environment": environment_info(device), "preset": args.preset, "dtype": args.dtype,
              "num_layers": model.config.num_hidden_layers, "parameters": n_params,
              "yaml": str(Path(args.yaml).resolve().relative_to(REPO)) if Path(args.yaml).resolve().is_relative_to(
                  REPO) else args.yaml,
              "memory_kwargs": {m: memory_config(args, m).kwargs for m in args.methods if METHOD_TYPES[m]},
              "chunk_size": chunk, "window": window, "question": question, "warmup_length": args.warmup_length,
              "tiny": args.tiny, "rows": rows}
    result["acceptance"] = acceptance(rows)
    result["total_s"] = time.perf_counter() - t_start
    md = render(result)
    print(md, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(jsonable(result), indent=1))
        (out / "results.md").write_text(md)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
