"""Data-parallel evaluation (`mllm_efficiency.eval.data_parallel`): shard, batch, gather back in prompt order.

Single process: runs in the test process (no `accelerate launch`). Two processes: `accelerate launch --multi_gpu
--num_processes 2` of a trivial worker script on CPU (gloo; torchrun underneath), ~10 s on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mllm_efficiency.eval.data_parallel import default_state, finish, run_data_parallel, shard_indices

SRC = Path(__file__).resolve().parents[1] / "src"


def test_single_process_keeps_order_and_batches():
    state = default_state()
    assert state.num_processes == 1
    prompts = [f"p{i}" for i in range(11)]
    calls = []

    def generate_fn(batch):
        calls.append(list(batch))
        return [s.upper() for s in batch]

    assert run_data_parallel(prompts, generate_fn, batch_size=4) == [s.upper() for s in prompts]
    assert calls == [prompts[0:4], prompts[4:8], prompts[8:11]]  # consecutive batches of <= 4, in order
    assert shard_indices(len(prompts)) == list(range(11))
    assert run_data_parallel([], generate_fn, batch_size=4) == []
    finish(state)  # no process group in a single process: nothing to tear down, no error


def test_single_process_checks_generate_fn():
    with pytest.raises(ValueError, match="returned 1 results for a batch of 2"):
        run_data_parallel(["a", "b"], lambda batch: batch[:1], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        run_data_parallel(["a"], lambda batch: batch, batch_size=0)


WORKER = """
import json, os, sys
sys.path.insert(0, {src!r})
from accelerate import PartialState
from mllm_efficiency.eval.data_parallel import finish, run_data_parallel

state = PartialState(cpu=True)
prompts = list(range(13))  # odd count: rank 0 gets 7, rank 1 gets 6
seen = []

def generate_fn(batch):
    seen.extend(batch)
    return [dict(prompt=p, square=p * p, rank=state.process_index) for p in batch]

results = run_data_parallel(prompts, generate_fn, batch_size=3, state=state)
with open(os.path.join({out!r}, f"rank{{state.process_index}}.json"), "w") as f:
    json.dump(dict(num_processes=state.num_processes, seen=seen, results=results), f)
finish(state)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_merge_in_order(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(src=str(SRC), out=str(tmp_path))))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script)]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    # each rank ran a disjoint, contiguous half, and together they ran every prompt once
    assert ranks[0]["seen"] == list(range(0, 7)) and ranks[1]["seen"] == list(range(7, 13))
    # every rank got all results back, in prompt order, from the rank that produced them
    for r in ranks:
        assert [x["prompt"] for x in r["results"]] == list(range(13))
        assert [x["square"] for x in r["results"]] == [p * p for p in range(13)]
        assert [x["rank"] for x in r["results"]] == [0] * 7 + [1] * 6
