#!/usr/bin/env python3
"""Multi-GPU data-parallel evaluation: throughput of greedy generation over a prompt set on 1 vs N processes.

Worker mode (the default; run under `accelerate launch`, or plain `python` for one process): every process builds
its own full random-weight model of `--preset` on `cuda:{local_process_index}` (bf16, SDPA), optionally attaches a
method (`mllm_efficiency.apply(model, --method, **--params)`), and the `--prompts` random-token prompts of
`--prompt-len` tokens are sharded across the processes (`mllm_efficiency.eval.data_parallel.run_data_parallel`:
contiguous slices, batches of `--batch`, results gathered back in prompt order). Each batch runs
`model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)` (min = max: random weights may emit EOS, the
work per prompt stays fixed). One warm-up batch per process first, not timed; the timed region is
barrier -> whole evaluation incl. the gather -> barrier. Rank 0 writes JSON to `--out`.

Driver mode (`--compare 1,2`): runs this script itself through `accelerate launch --num_processes n` for each n
(same python; `--multi_gpu` for n > 1; NVLink multicast kept off: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) and writes `results.json` + `results.md` to
`--out-dir` with the scaling ratio throughput_n / throughput_first and the acceptance line (>= 1.8x at 2 processes).

GPU (2 H200s; ~1-2 min, see README.md):
  PYTHONPATH=src python benchmarks/multigpu/bench_dp.py --compare 1,2 --preset llama-2-7b --prompts 64 \
      --prompt-len 1024 --new-tokens 32 --batch 8 --out-dir benchmarks/multigpu
CPU smoke (tiny model, gloo; ~30 s on 2 cores, numbers meaningless):
  PYTHONPATH=src python benchmarks/multigpu/bench_dp.py --tiny --device cpu --compare 1,2 --out-dir /tmp/dp_smoke
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# keep NVLink multicast off for NCCL / symmetric memory / NVSHMEM (set before torch.distributed starts)
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST_ENV)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

ACCEPT_SCALING = 1.8  # acceptance: throughput at 2 processes >= 1.8x that at 1
DTYPES = ("bf16", "fp16", "fp32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset of mllm_efficiency.bench.presets "
                   "(default llama-2-7b; tiny-llama with --tiny)")
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny-llama preset, fp32, CPU, 128-token prompts")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default cuda (cpu with --tiny)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default bf16 (fp32 on CPU)")
    p.add_argument("--prompts", type=int, default=64, help="number of prompts")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="tokens per prompt (random ids, equal lengths); default 1024 (128 with --tiny)")
    p.add_argument("--new-tokens", type=int, default=32, help="generated tokens per prompt (greedy)")
    p.add_argument("--batch", type=int, default=8, help="prompts per generate call")
    p.add_argument("--method", default="vanilla", help="vanilla (none) or a method name, e.g. snapkv")
    p.add_argument("--params", default="", help="method parameters, e.g. ratio=0.5 or k=2,ratio=0.75")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="worker mode: rank 0 writes its JSON here")
    p.add_argument("--compare", default=None, help="driver mode: process counts, e.g. 1,2")
    p.add_argument("--out-dir", default=None, help="driver mode: where results.json / results.md go "
                   "(default benchmarks/multigpu)")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.preset = args.preset or ("tiny-llama" if args.tiny else "llama-2-7b")
    args.prompt_len = args.prompt_len or (128 if args.tiny else 1024)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    for name in ("prompts", "prompt_len", "new_tokens", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def parse_params(text: str) -> dict:
    """'k=2,ratio=0.75' -> {'k': 2, 'ratio': 0.75} (int, then float, then true/false, else the string)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep:
            raise SystemExit(f"--params: expected KEY=VALUE, got {item!r}")
        for conv in (int, float):
            try:
                out[key.strip()] = conv(val)
                break
            except ValueError:
                pass
        else:
            out[key.strip()] = {"true": True, "false": False}.get(val.lower(), val)
    return out


# ----------------------------------------------------------------------------------------------------- worker


def worker(args) -> int:
    import torch

    import mllm_efficiency as me
    from mllm_efficiency.bench.presets import build_preset
    from mllm_efficiency.bench.timing import environment_info
    from mllm_efficiency.eval.data_parallel import finish, run_data_parallel, shard_indices
    from accelerate import PartialState
    from accelerate.utils import gather_object

    cpu = args.device == "cpu"
    state = PartialState(cpu=cpu)
    if cpu:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny models gain nothing from threads; a loaded small box loses a lot
    else:
        device = torch.device("cuda", state.local_process_index)
        torch.cuda.set_device(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    log = (lambda *a: print(*a, flush=True)) if state.is_main_process else (lambda *a: None)

    t0 = time.perf_counter()
    model = build_preset(args.preset, device, dtype, attn="sdpa", seed=args.seed)
    params = parse_params(args.params)
    handle = me.apply(model, args.method, **params) if args.method != "vanilla" else None
    build_s = time.perf_counter() - t0
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = cfg.vocab_size

    g = torch.Generator().manual_seed(args.seed)  # the same prompts on every process
    prompts = list(torch.randint(3, vocab - 8, (args.prompts, args.prompt_len), generator=g))
    busy = [0.0]

    def generate_fn(batch):
        t = time.perf_counter()
        ids = torch.stack(batch).to(device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=cfg.pad_token_id)
        new = out[:, ids.shape[1]:].cpu().tolist()  # .cpu() synchronises the device
        busy[0] += time.perf_counter() - t
        return new

    log(f"[dp] {state.num_processes} process(es), {args.preset} {args.dtype} on {device.type}, "
        f"built in {build_s:.1f} s; {args.prompts} prompts x {args.prompt_len} tokens, batch {args.batch}, "
        f"{args.new_tokens} new tokens, method {args.method} {params or ''}")
    t = time.perf_counter()
    generate_fn(prompts[:min(args.batch, len(prompts))])  # warm-up (CUDA context, cuBLAS, allocator): not timed
    warmup_s = time.perf_counter() - t
    busy[0] = 0.0

    state.wait_for_everyone()
    t = time.perf_counter()
    results = run_data_parallel(prompts, generate_fn, batch_size=args.batch, state=state)
    state.wait_for_everyone()
    seconds = time.perf_counter() - t

    mine = shard_indices(len(prompts), state)
    local = [dict(rank=state.process_index, device=str(device), prompts=len(mine),
                  first=mine[0] if mine else None, last=mine[-1] if mine else None, busy_s=busy[0],
                  warmup_s=warmup_s, build_s=build_s)]
    per_rank = gather_object(local) if state.num_processes > 1 else local
    if handle is not None:
        handle.remove()

    if state.is_main_process:
        tokens = sum(len(r) for r in results)
        import accelerate

        result = dict(
            command="python " + " ".join(sys.argv),
            environment=dict(environment_info(device), accelerate=accelerate.__version__), preset=args.preset,
            dtype=args.dtype, device=args.device, method=args.method, params=params, processes=state.num_processes,
            prompts=len(prompts), prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
            seconds=seconds, prompts_per_s=len(prompts) / seconds, tokens_per_s=tokens / seconds,
            generated_tokens=tokens, per_rank=per_rank,
            gathered_in_order=len(results) == len(prompts))
        log(f"[dp] {state.num_processes} process(es): {seconds:.2f} s, {result['prompts_per_s']:.2f} prompts/s, "
            f"{result['tokens_per_s']:.1f} tokens/s; per rank: "
            + ", ".join(f"rank {r['rank']} {r['prompts']} prompts [{r['first']}..{r['last']}] busy {r['busy_s']:.2f} s"
                        for r in per_rank))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    finish(state)
    return 0


# ----------------------------------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(n: int, args, out_json: Path) -> list[str]:
    """`accelerate launch` (this python) of this script in worker mode on `n` processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if n > 1:
        # torchrun underneath; also the way to get n CPU processes (`--cpu` alone starts one without an MPI hostfile)
        cmd += ["--multi_gpu", "--main_process_port", str(_free_port())]
    elif args.device == "cpu":
        cmd += ["--cpu", "--num_cpu_threads_per_process", "1"]
    cmd += [str(Path(__file__).resolve()), "--preset", args.preset, "--device", args.device, "--dtype", args.dtype,
            "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
            "--batch", str(args.batch), "--method", args.method, "--params", args.params, "--seed", str(args.seed),
            "--out", str(out_json)]
    return cmd


def driver(args) -> int:
    counts = [int(c) for c in args.compare.split(",") if c.strip()]
    out_dir = Path(args.out_dir or Path(__file__).resolve().parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **NO_MULTICAST_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    if args.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    t_start = time.perf_counter()
    runs = []
    for n in counts:
        out_json = out_dir / f"run_{n}proc.json"
        out_json.unlink(missing_ok=True)
        cmd = launch_command(n, args, out_json)
        print(f"[driver] {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0 or not out_json.exists():
            print(f"[driver] run on {n} process(es) failed (exit {rc})", file=sys.stderr)
            return rc or 1
        run = json.loads(out_json.read_text())
        run["launch_wall_s"] = time.perf_counter() - t
        out_json.unlink()
        runs.append(run)
    base = runs[0]
    for r in runs:
        r["scaling"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["efficiency"] = r["scaling"] * base["processes"] / r["processes"]
    two = next((r for r in runs if r["processes"] == 2), None)
    accept = None
    if two is not None and base["processes"] == 1:
        accept = dict(criterion=f"throughput_2 / throughput_1 >= {ACCEPT_SCALING}", scaling=two["scaling"],
                      passed=two["scaling"] >= ACCEPT_SCALING)
    result = dict(command="python " + " ".join(sys.argv), runs=runs, acceptance=accept,
                  total_s=time.perf_counter() - t_start)
    md = render(result)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "results.md").write_text(md)
    print(md)
    print(f"[driver] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return 0


def render(result) -> str:
    r0 = result["runs"][0]
    env = r0["environment"]
    lines = [f"## Data-parallel evaluation: {r0['preset']} ({r0['dtype']}, random weights), "
             f"{r0['prompts']} prompts x {r0['prompt_len']} tokens, {r0['new_tokens']} new tokens, batch {r0['batch']}",
             "",
             f"- device: {env.get('gpu') or r0['device']}, one per process; torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"accelerate {env.get('accelerate')}; method {r0['method']} {r0['params'] or ''}",
             f"- command: `{result['command']}`",
             "- timed: barrier -> sharded greedy generation of all prompts + gather to every rank -> barrier "
             "(one warm-up batch per process before, not timed); each process holds a full model on its own device",
             "",
             "| processes | seconds | prompts/s | tokens/s | scaling | efficiency | per-rank prompts | per-rank busy s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['processes']} | {r['seconds']:.2f} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['scaling']:.2f}x | {100 * r['efficiency']:.0f}% | "
                     f"{' / '.join(str(p['prompts']) for p in r['per_rank'])} | "
                     f"{' / '.join('%.2f' % p['busy_s'] for p in r['per_rank'])} |")
    lines.append("")
    acc = result["acceptance"]
    if acc is not None:
        lines.append(f"**Acceptance ({acc['criterion']}): {acc['scaling']:.2f}x -> "
                     f"{'PASS' if acc['passed'] else 'FAIL'}**")
        lines.append("")
    lines.append(f"Total driver time (model builds and process start-up included): {result['total_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    return driver(args) if args.compare else worker(args)


if __name__ == "__main__":
    sys.exit(main())
