"""Data-parallel evaluation: shard prompts across `accelerate` processes, run them in batches, gather in order.

Every process holds its own full model (one per GPU) and runs a contiguous slice of the prompt list; the
results come back to every process in the original prompt order::

    from accelerate import PartialState
    from mllm_efficiency.eval.data_parallel import run_data_parallel

    state = PartialState()
    model = build_model().to(state.device)
    results = run_data_parallel(prompts, lambda batch: my_generate(model, batch), batch_size=8, state=state)
    if state.is_main_process:
        write(results)                       # len(results) == len(prompts), results[i] belongs to prompts[i]
    finish(state)                            # wait for every process, then tear the process group down

Launch with ``accelerate launch --num_processes N script.py`` (``--multi_gpu`` for N > 1), or run the script with
plain ``python`` for one process: `accelerate.PartialState` then reports a single, non-distributed process and
nothing here needs a process group.

CPU processes: `PartialState` only forms a CPU (gloo) group when built with ``cpu=True``; :func:`default_state`
does that when CUDA is absent or ``ACCELERATE_USE_CPU`` is set. ``accelerate launch --cpu --num_processes 2``
starts a single process unless an MPI hostfile is given; ``accelerate launch --multi_gpu --num_processes 2``
(torchrun underneath) starts two CPU processes on a machine without GPUs.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["default_state", "shard_indices", "run_data_parallel", "finish"]


def default_state():
    """The process's `accelerate.PartialState` (a shared singleton: the first construction in a process wins).

    CPU mode (gloo) when no CUDA device is present or ``ACCELERATE_USE_CPU`` is true, so the same script runs on
    GPUs and on a CPU-only machine."""
    import torch
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def shard_indices(num_items: int, state=None) -> list[int]:
    """The prompt indices this process runs: a contiguous, order-keeping slice of ``range(num_items)``
    (`PartialState.split_between_processes`; the first ``num_items % num_processes`` ranks get one more).
    The slices of all ranks are disjoint and cover every index exactly once."""
    state = state or default_state()
    with state.split_between_processes(list(range(num_items))) as mine:
        return list(mine)


def run_data_parallel(prompts: Sequence[Any], generate_fn: Callable[[list], Sequence[Any]], batch_size: int = 8,
                      state=None) -> list:
    """Run `prompts` through `generate_fn` sharded across the processes of `state`; every process gets all results.

    Args:
        prompts: the full prompt list, identical on every process (each one picks its own slice).
        generate_fn: ``generate_fn(batch) -> results``, called with consecutive lists of at most `batch_size` prompts
            of this process's slice; must return one result per prompt, in order. Results must be picklable.
        batch_size: prompts per `generate_fn` call.
        state: an `accelerate.PartialState`; :func:`default_state` when omitted.

    Returns:
        ``results`` with ``results[i]`` the result of ``prompts[i]``, on every process (an all-gather through
        `accelerate.utils.gather_object`; collective: every process must call this function). One process: no
        communication at all.
    """
    from accelerate.utils import gather_object

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    state = state or default_state()
    mine = shard_indices(len(prompts), state)
    local = []  # (prompt index, result) pairs, so the merge does not depend on how the slices were cut
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        out = list(generate_fn([prompts[i] for i in idx]))
        if len(out) != len(idx):
            raise ValueError(f"generate_fn returned {len(out)} results for a batch of {len(idx)} prompts")
        local.extend(zip(idx, out))
    pairs = gather_object(local) if state.num_processes > 1 else local
    pairs = sorted(pairs, key=lambda p: p[0])
    if [i for i, _ in pairs] != list(range(len(prompts))):
        raise RuntimeError(f"gathered {len(pairs)} results for {len(prompts)} prompts (processes disagree on the "
                           "prompt list?)")
    return [r for _, r in pairs]


def finish(state=None) -> None:
    """End of a data-parallel script: every process waits for the others, then the process group is destroyed.
    Left to interpreter exit, the gloo group's teardown can abort a process ("terminate called without an active
    exception", SIGABRT) after all its work is done. No-op in a single, non-distributed process."""
    import torch.distributed as dist

    state = default_state() if state is None else state
    if state.num_processes > 1:
        state.wait_for_everyone()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
