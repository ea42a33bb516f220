"""Long-context accuracy of the memory methods on a real small model (docs/long_context_memory.md).

Q-LLM vs InfLLM vs StreamingLLM (memory variant) vs LM-Infinite vs full attention on the synthetic tasks of
mllm_efficiency.eval.longctx (passkey, number_string, kv_retrieval, niah), question first+last or last only.
Every method gets the same attended budget (n_init 128, n_local 1024; InfLLM/Q-LLM add topk 8 x 128-token
blocks = the paper's "2K window"). Writes results.json, results.md and accuracy.png (if matplotlib) to OUT.

    python benchmarks/memory/run_memory_bench.py OUT                      # acceptance: passkey 32k, GPU
    python benchmarks/memory/run_memory_bench.py OUT --gguf /tmp/qwen.gguf --grid
    python benchmarks/memory/run_memory_bench.py OUT --tiny               # CPU smoke run (tiny random model)
    python benchmarks/memory/run_memory_bench.py OUT --replot             # results.md + plot from results.json

Cells and order. The primary cells (--tasks x --lengths x --placements, --n samples each) run first, sample by
sample; then, with --grid, the grid cells (--grid-tasks x --grid-lengths x --grid-placements, --grid-n samples
each; a cell already primary is not repeated) in rounds: round r adds the r-th sample to every grid cell (longest
length first), so a time budget that runs out leaves every cell with the same number of samples, give or take
one. One sample = one prompt run through every method (the methods of a cell always see the same prompts).

Depths: --depths spread (default; n depths evenly over [0, 1], the library default) or mid (the midpoints of n
equal bins: no key in the sinks or in the last window, where even StreamingLLM sees it). Within a grid cell the
samples are taken middle-out (the first is the one nearest depth 0.5).

Q-LLM gets its question as the token span of its first copy in the prompt (GreedySearch's question_span; with the
question first+last, the copy before the context, in the first chunk, as in the paper; kv_retrieval: the key);
a span past the first chunk (question last) runs through GreedySearch's one-off question probe.

Decoding stops as soon as the score is decided (eval.longctx.score_is_final: same scores as a full-length
generation, shorter predictions; --no-early-stop decodes the whole --max-new budget). The continuation runs
through GreedySearch's multi-turn carry, 8 tokens per call.

Time guard (--max-minutes M, counted from the start of the process, model loading included): before each
sample the time it will take is predicted from the samples run so far (per method: prefill seconds per prompt
token, decode seconds per token, times the task's token budget); a sample that would end past the budget is
skipped and listed under "skipped" in results.json (the remaining ones are still tried: a shorter one may fit).
Results are rewritten after every sample; SIGTERM (e.g. from `timeout`) writes them and exits cleanly.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()  # the time budget counts from here (before the torch import)

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

METHODS = {
    "qllm": ("qllm", dict(n_init=128, n_local=1024, block_size=128, topk=8, repr_topk=4, max_cached_block=32,
                          exc_block_size=512, question_weight=1.0)),
    "infllm": ("infllm", dict(n_init=128, n_local=1024, block_size=128, topk=8, repr_topk=4, max_cached_block=32,
                              exc_block_size=512)),
    "streamingllm": ("streamingllm_memory", dict(n_init=128, n_local=1024, exc_block_size=512)),
    "lm_infinite": ("lm_infinite", dict(n_init=128, n_local=1024, exc_block_size=512)),
    "full": (None, {}),
}
TINY_SCALE = dict(n_init=8, n_local=64, block_size=16, topk=2, repr_topk=2, max_cached_block=4, exc_block_size=32)
ALL_TASKS = ("passkey", "number_string", "kv_retrieval", "niah")
GRID_LENGTHS = (8192, 16384, 32768)
GRID_PLACEMENTS = ("first_last", "last")
DECODE_STEP = 8  # new tokens per GreedySearch call when stopping early


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output directory")
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="zoo alias, GGUF file or HF directory")
    p.add_argument("--gguf", default=None, help="path of a GGUF file (overrides --model; loaded without conversion)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (save_pretrained of the model's tokenizer): skips building the "
                        "tokenizer from the GGUF (~15 s for Qwen2.5)")
    p.add_argument("--tasks", default="passkey", help="primary cells: comma-separated tasks")
    p.add_argument("--lengths", default="32768", help="primary cells: comma-separated prompt lengths (tokens)")
    p.add_argument("--placements", default="first_last", help="primary cells: first_last,last,first")
    p.add_argument("--n", type=int, default=10, help="samples per primary cell")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--grid", "--full", dest="grid", action="store_true",
                   help="also run the grid: 4 tasks x 8k/16k/32k x first_last/last (after the primary cells)")
    p.add_argument("--grid-tasks", default=",".join(ALL_TASKS))
    p.add_argument("--grid-lengths", default=",".join(map(str, GRID_LENGTHS)))
    p.add_argument("--grid-placements", default=",".join(GRID_PLACEMENTS))
    p.add_argument("--grid-n", type=int, default=None, help="samples per grid cell (default: --n)")
    p.add_argument("--depths", choices=("spread", "mid"), default="spread",
                   help="spread: i/(n-1) (includes 0 and 1); mid: (i+0.5)/n")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new", type=int, default=None,
                   help="cap on new tokens per sample (default: the task's 32/32/100/50; --tiny: 8)")
    p.add_argument("--no-early-stop", action="store_true", help="decode the whole token budget")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time budget of the whole process; samples predicted to end past it are skipped")
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random Llama, 600-token prompts")
    p.add_argument("--replot", action="store_true", help="rewrite results.md and the plot from OUT/results.json")
    args = p.parse_args(argv)
    for name in args.methods.split(","):
        if name not in METHODS:
            p.error(f"unknown method {name!r}; methods: {list(METHODS)}")
    if args.n < 1 or (args.grid_n is not None and args.grid_n < 1):
        p.error("--n and --grid-n must be >= 1")
    if args.tiny:
        args.n = min(args.n, 2)
    return args


# ------------------------------------------------------------------------------------------------ loading
def load(args):
    from mllm_efficiency.zoo import load_model, load_tokenizer

    if args.tiny:
        from mllm_efficiency.testing import tiny_llama_lm

        tok = load_tokenizer("smollm2-135m")
        model = tiny_llama_lm(num_layers=2, vocab_size=len(tok), max_position_embeddings=4096)
        return model, tok, "smollm2-135m"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if device == "cuda" else "float32"
    if args.tokenizer is None:
        model, tok = load_model(args.gguf or args.model, dtype=dtype, device=device, convert=args.gguf is None)
        return model, tok, "model"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return _load_weights(args.gguf or args.model, dtype, device, convert=args.gguf is None), tok, args.tokenizer


def _load_weights(name, dtype, device, convert):
    """The model alone (the tokenizer comes from --tokenizer): a GGUF file without conversion is read with
    from_pretrained(dir, gguf_file=...) exactly as zoo.load_model does, minus the tokenizer build."""
    from transformers import AutoModelForCausalLM

    from mllm_efficiency.zoo import load_model, resolve_model
    from mllm_efficiency.zoo.gguf import _as_dtype, _require_gguf, _strip_gguf_quantizer

    source = resolve_model(name)
    if not (source.format == "gguf" and not convert):
        return load_model(name, dtype=dtype, device=device, convert=convert)[0]
    _require_gguf(source)
    model = AutoModelForCausalLM.from_pretrained(str(source.gguf_dir), gguf_file=source.gguf_file,
                                                 dtype=_as_dtype(dtype), attn_implementation="sdpa")
    _strip_gguf_quantizer(model)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------ plan
def depth_plan(n: int, kind: str) -> list[float]:
    """The n depths of a cell: spread = eval.longctx.default_depths (0..1 inclusive), mid = bin midpoints."""
    from mllm_efficiency.eval.longctx import default_depths

    if kind == "mid":
        return [(i + 0.5) / n for i in range(n)]
    return default_depths(n)


def middle_out(depths: list[float]) -> list[int]:
    """Indices of `depths` in farthest-point order from the one nearest 0.5 (ties: lower index): any prefix is
    spread over the range."""
    if not depths:
        return []
    order = [min(range(len(depths)), key=lambda i: (abs(depths[i] - 0.5), i))]
    while len(order) < len(depths):
        rest = [i for i in range(len(depths)) if i not in order]
        order.append(max(rest, key=lambda i: (min(abs(depths[i] - depths[j]) for j in order), -i)))
    return order


def plan_units(args) -> list[dict]:
    """Every sample to run, in order: primary cells sample by sample, then grid rounds (longest first)."""
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    if args.tiny:
        lengths, glengths = [600], [600]
    else:
        lengths, glengths = [int(x) for x in split(args.lengths)], [int(x) for x in split(args.grid_lengths)]
    primary = [(t, ln, p) for t in split(args.tasks) for ln in lengths for p in split(args.placements)]
    units = []
    for cell in primary:
        depths = depth_plan(args.n, args.depths)
        units += [dict(task=cell[0], length=cell[1], placement=cell[2], index=i, depth=depths[i], kind="primary")
                  for i in range(args.n)]
    if args.grid:
        gn = args.grid_n or args.n
        cells = [(t, ln, p) for ln in sorted(set(glengths), reverse=True) for t in split(args.grid_tasks)
                 for p in split(args.grid_placements) if (t, ln, p) not in primary]
        depths = depth_plan(gn, args.depths)
        order = middle_out(depths)
        for r in range(gn):
            units += [dict(task=c[0], length=c[1], placement=c[2], index=order[r], depth=depths[order[r]],
                           kind=f"grid round {r + 1}") for c in cells]
    return units


# ------------------------------------------------------------------------------------------------ running
def run_one(model, tok, sample, method, kwargs, chunk_size, max_new, early_stop=True):
    """One prompt with one method: chunked prefill + greedy decoding (GreedySearch); with early_stop, decoding
    continues DECODE_STEP tokens at a time (the GreedySearch carry) until the score is decided."""
    import mllm_efficiency as me
    from mllm_efficiency.eval.longctx import score, score_is_final
    from mllm_efficiency.memory import GreedySearch

    ids = tok(sample.prompt, add_special_tokens=sample.add_special_tokens)["input_ids"]
    q = {}
    if method == "qllm":
        span = question_span(tok, sample, ids)
        q = {"question_span": span} if span is not None else {"question": sample.question}
    handle = me.apply(model, method, **kwargs) if method else None
    try:
        gs = GreedySearch(model, tok)
        step = min(DECODE_STEP, max_new) if early_stop else max_new
        t0 = time.perf_counter()
        gs.generate(input_ids=[ids], max_new_tokens=step, chunk_size=chunk_size, **q)
        first = gs.last_stats
        new, calls, peak = list(first["new_token_ids"]), 1, first.get("peak_memory_GB")
        last_n = len(new)
        while early_stop and last_n == step and len(new) < max_new and \
                not score_is_final(sample.task, tok.decode(new, skip_special_tokens=True), sample.answer):
            step = min(DECODE_STEP, max_new - len(new))
            gs.generate(input_ids=[[]], max_new_tokens=step, chunk_size=chunk_size)  # feeds the carried token
            last_n = len(gs.last_stats["new_token_ids"])
            new += gs.last_stats["new_token_ids"]
            calls += 1
            if gs.last_stats.get("peak_memory_GB") is not None:
                peak = max(peak or 0.0, gs.last_stats["peak_memory_GB"])
        dt = time.perf_counter() - t0
    finally:
        if handle is not None:
            handle.remove()
    pred = tok.decode(new, skip_special_tokens=True)
    return {"id": sample.id, "task": sample.task, "length": sample.target_length, "tokens": len(ids),
            "placement": sample.placement, "depth": round(sample.depth, 4), "answer": sample.answer,
            "prediction": pred, "score": score(sample.task, pred, sample.answer), "time_s": round(dt, 3),
            "prefill_s": round(first["prefill_time_sec"], 3), "decode_s": round(dt - first["prefill_time_sec"], 3),
            "new_tokens": len(new), "max_new_tokens": max_new, "decode_calls": calls, "peak_memory_GB": peak,
            "question_source": first.get("question_source")}


def question_span(tok, sample, ids):
    """Q-LLM's question as the token span of its first occurrence in the prompt (GreedySearch's explicit
    `question_span`): with the question first+last that is the copy before the context, inside the first chunk,
    as in the paper. (`question=` text would match the copy at the end first: the copy at the start tokenizes
    differently after "...: ", so Q-LLM would fall back to the separate probe.) kv_retrieval asks for its key: with
    the question first the key in the instruction, with the question last the closing `Key: "..."` line.
    None if offsets are unavailable (then the question text is passed)."""
    text = sample.meta["key"] if sample.task == "kv_retrieval" and sample.placement != "last" else sample.question
    at = sample.prompt.find(text)
    if at < 0:
        return None
    try:
        enc = tok(sample.prompt, add_special_tokens=sample.add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    if list(enc["input_ids"]) != list(ids):
        return None
    hit = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > at and a < at + len(text)]
    return (hit[0], hit[-1] + 1) if hit else None


class Predictor:
    """Seconds a sample will take, from the records so far: per method, prefill s/prompt token and decode
    s/new token (the decode budget counted whole); sample building s/token."""

    def __init__(self):
        self.prefill, self.decode, self.build = {}, {}, []

    def observe(self, rec):
        self.prefill.setdefault(rec["method"], []).append(rec["prefill_s"] / max(rec["tokens"], 1))
        if rec["new_tokens"]:
            self.decode.setdefault(rec["method"], []).append(rec["decode_s"] / rec["new_tokens"])

    def observe_build(self, seconds, length):
        self.build.append(seconds / max(length, 1))

    @staticmethod
    def _mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    def predict(self, methods, length, max_new):
        t = self._mean(self.build) * length
        for m in methods:
            t += self._mean(self.prefill.get(m, [])) * length + self._mean(self.decode.get(m, [])) * max_new
        return t


class _Stop(Exception):
    pass


def _on_term(signum, frame):
    raise _Stop(f"signal {signum}")


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.replot:
        data = json.loads((out / "results.json").read_text())
        write_tables(out, data)
        _plot(data["summary"], data["meta"]["method_names"], out / "accuracy.png")
        return 0
    from mllm_efficiency.eval.longctx import DEFAULT_MAX_NEW_TOKENS, make_sample

    out.mkdir(parents=True, exist_ok=True)
    deadline = T_START + 60 * args.max_minutes if args.max_minutes is not None else None
    methods = args.methods.split(",")
    units = plan_units(args)
    model, tok, tok_source = load(args)
    old_term = signal.signal(signal.SIGTERM, _on_term)  # from here on SIGTERM writes the results and exits
    t_loaded = time.perf_counter() - T_START
    print(f"loaded in {t_loaded:.0f} s; {len(units)} samples x {len(methods)} methods planned", flush=True)
    meta = {"model": "tiny random Llama" if args.tiny else args.gguf or args.model, "tokenizer": tok_source,
            "tiny": args.tiny, "method_names": methods, "methods": {m: METHODS[m] for m in methods},
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "argv": sys.argv if argv is None else ["run_memory_bench.py", *argv],
            "chunk_size": args.chunk_size, "depths": args.depths, "seed": args.seed, "max_new": args.max_new,
            "early_stop": not args.no_early_stop, "max_minutes": args.max_minutes, "load_s": round(t_loaded, 1)}
    if args.tiny:
        meta["tiny_scale"] = TINY_SCALE
    data = {"meta": meta, "summary": [], "records": [], "skipped": [], "complete": False}
    pred = Predictor()
    stopped = None
    handled = set()  # units run or skipped
    try:
        for u in units:
            key = (u["task"], u["length"], u["placement"], u["index"])
            cap = args.max_new if args.max_new is not None else (8 if args.tiny else None)
            max_new = min(DEFAULT_MAX_NEW_TOKENS[u["task"]], cap) if cap else DEFAULT_MAX_NEW_TOKENS[u["task"]]
            cell = {k: u[k] for k in ("task", "length", "placement", "index", "depth", "kind")}
            now = time.perf_counter()
            eta = pred.predict(methods, u["length"], max_new)
            if stopped or (deadline is not None and now + eta > deadline):
                reason = stopped or f"time: predicted {eta:.0f} s, {max(deadline - now, 0):.0f} s left"
                data["skipped"].append(dict(cell, reason=reason))
                handled.add(key)
                continue
            t0 = time.perf_counter()
            sample = make_sample(u["task"], tok, u["length"], u["depth"], seed=args.seed, index=u["index"],
                                 placement=u["placement"])
            pred.observe_build(time.perf_counter() - t0, u["length"])
            recs = []
            for name in methods:
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = "time: budget spent"
                    break
                method, kwargs = METHODS[name]
                kwargs = dict(kwargs, **TINY_SCALE) if args.tiny and method else dict(kwargs)
                if args.tiny and method in ("streamingllm_memory", "lm_infinite"):
                    kwargs = {k: kwargs[k] for k in ("n_init", "n_local", "exc_block_size")}
                r = run_one(model, tok, sample, method, kwargs, args.chunk_size, max_new, not args.no_early_stop)
                r.update(method=name, index=u["index"], kind=u["kind"])
                pred.observe(r)
                recs.append(r)
            for r in recs:  # a sample cut in the middle of its methods is kept but left out of the summary
                r["partial_unit"] = len(recs) < len(methods)
            data["records"] += recs
            handled.add(key)
            if len(recs) < len(methods):
                data["skipped"].append(dict(cell, reason=f"{stopped} (ran only {[r['method'] for r in recs]})"))
            summarize(data, methods)
            write_results(out, data, time.perf_counter() - T_START)
            acc = " ".join(f"{r['method']}={r['score']:.2f}" for r in recs)
            print(f"{u['kind']:13s} {u['task']:13s} {u['length']:6d} {u['placement']:10s} depth {u['depth']:.2f} "
                  f"{acc} ({time.perf_counter() - T_START:.0f} s)", flush=True)
    except (_Stop, KeyboardInterrupt) as exc:
        data["interrupted"] = str(exc) or "SIGINT"
        data["skipped"] += [dict({k: u[k] for k in ("task", "length", "placement", "index", "depth", "kind")},
                                 reason=f"interrupted ({data['interrupted']})") for u in units
                            if (u["task"], u["length"], u["placement"], u["index"]) not in handled]
    finally:
        signal.signal(signal.SIGTERM, old_term)
    data["complete"] = not data["skipped"] and not data.get("interrupted")
    summarize(data, methods)
    write_results(out, data, time.perf_counter() - T_START)
    print((out / "results.md").read_text())
    _plot(data["summary"], methods, out / "accuracy.png")
    return 0


# ------------------------------------------------------------------------------------------------ output
def summarize(data, methods):
    """Per (task, length, placement, method): accuracy over the samples every method ran (partial units out)."""
    groups: dict = {}
    for r in data["records"]:
        if not r.get("partial_unit"):
            groups.setdefault((r["task"], r["length"], r["placement"], r["method"]), []).append(r)
    summary = []
    for (task, length, placement, name), recs in groups.items():
        peaks = [r["peak_memory_GB"] for r in recs if r.get("peak_memory_GB")]
        summary.append({"task": task, "length": length, "placement": placement, "method": name,
                        "accuracy": sum(r["score"] for r in recs) / len(recs), "n": len(recs),
                        "mean_time_s": round(sum(r["time_s"] for r in recs) / len(recs), 3),
                        "mean_prefill_s": round(sum(r["prefill_s"] for r in recs) / len(recs), 3),
                        "peak_memory_GB": round(max(peaks), 2) if peaks else None})
    order = {m: i for i, m in enumerate(methods)}
    summary.sort(key=lambda s: (ALL_TASKS.index(s["task"]) if s["task"] in ALL_TASKS else 99, s["length"],
                                s["placement"], order.get(s["method"], 99)))
    data["summary"] = summary


def write_results(out: Path, data, elapsed):
    data["meta"]["elapsed_s"] = round(elapsed, 1)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out / "results.json")
    write_tables(out, data)


def write_tables(out: Path, data):
    methods = data["meta"]["method_names"]
    summary = data["summary"]
    cells = []
    for s in summary:
        key = (s["task"], s["length"], s["placement"])
        if key not in cells:
            cells.append(key)
    by = {(s["task"], s["length"], s["placement"], s["method"]): s for s in summary}
    lines = [f"Model {data['meta']['model']} on {data['meta']['device']}; accuracy % (n samples); "
             f"{data['meta'].get('elapsed_s', '?')} s in all"
             + ("" if data.get("complete") else " (not every planned sample ran: see Skipped)"), "",
             "| task | length | placement | n | " + " | ".join(methods) + " |",
             "|---|---|---|---|" + "---|" * len(methods)]
    for task, length, placement in cells:
        row = [by.get((task, length, placement, m)) for m in methods]
        n = max((s["n"] for s in row if s), default=0)
        lines.append(f"| {task} | {length} | {placement} | {n} | "
                     + " | ".join(f"{s['accuracy'] * 100:.0f}" if s else "-" for s in row) + " |")
    lines += ["", "Mean seconds per sample (prefill + decode) / peak GiB:", "",
              "| task | length | placement | " + " | ".join(methods) + " |",
              "|---|---|---|" + "---|" * len(methods)]
    for task, length, placement in cells:
        row = [by.get((task, length, placement, m)) for m in methods]
        lines.append(f"| {task} | {length} | {placement} | " + " | ".join(
            (f"{s['mean_time_s']:.2f}" + (f" / {s['peak_memory_GB']:.1f}" if s["peak_memory_GB"] else ""))
            if s else "-" for s in row) + " |")
    acc = {m: by.get(("passkey", 32768, "first_last", m)) for m in methods}
    if any(acc.values()):
        def pct(m):
            return f"{acc[m]['accuracy'] * 100:.0f}% (n={acc[m]['n']})" if acc.get(m) else "not run"

        ok = [m for m in ("qllm", "infllm") if acc.get(m) and acc[m]["accuracy"] >= 0.9]
        lines += ["", "Acceptance (passkey, 32k, question first+last, n_local 1024): qllm " + pct("qllm")
                  + ", infllm " + pct("infllm") + " (need >= 90%: "
                  + ("PASS" if len(ok) == 2 else "FAIL") + "); streamingllm " + pct("streamingllm")
                  + " (should be near chance, ~0% for a 5-digit key)."]
    if data.get("skipped"):
        lines += ["", f"Skipped: {len(data['skipped'])} planned samples (results.json 'skipped'), e.g. "
                  + "; ".join(f"{s['task']} {s['length']} {s['placement']} #{s['index']}: {s['reason']}"
                              for s in data["skipped"][:3])]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _plot(summary, methods, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    if not summary:
        return
    keys = sorted({(s["task"], s["placement"]) for s in summary},
                  key=lambda k: (ALL_TASKS.index(k[0]) if k[0] in ALL_TASKS else 99, k[1]))
    cols = min(len(keys), 4)
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (task, placement) in zip(axes.flat, keys):
        lengths = set()
        for i, m in enumerate(methods):  # markers and dashes differ so equal curves (all 100%) stay visible
            pts = sorted((s["length"], s["accuracy"], s["n"]) for s in summary
                         if (s["task"], s["placement"], s["method"]) == (task, placement, m))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], marker="os^Dv"[i % 5],
                        linestyle=("-", "--", "-.", ":")[i % 4], markersize=7 - i, label=m)
                lengths.update(p[0] for p in pts)
        ns = sorted({(s["length"], s["n"]) for s in summary if (s["task"], s["placement"]) == (task, placement)})
        ax.set_title(f"{task} ({placement})\nn: " + ", ".join(f"{ln // 1024}k:{n}" for ln, n in ns), fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(lengths), [f"{ln / 1024:g}k" for ln in sorted(lengths)])
        ax.minorticks_off()
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-5, 105)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
