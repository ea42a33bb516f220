"""One model with a method attached, used from two threads at once: the second forward is refused with a clear
error and the first one's result is unchanged."""
from __future__ import annotations

import threading

import pytest
import torch

import mllm_efficiency as me
from conftest import apply_quiet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MEMORY = dict(n_init=4, n_local=32, block_size=8, topk=2, exc_block_size=16, max_cached_block=4, repr_topk=2)


def _held_forward(model, layer, ids):
    """Start `model.generate(ids)` in a thread that pauses inside decoder `layer` until released."""
    entered, release, result = threading.Event(), threading.Event(), {}

    def pause(module, args):
        if threading.current_thread() is worker:
            entered.set()
            release.wait(10)

    def run():
        try:
            with torch.no_grad():
                result["out"] = model.generate(ids, max_new_tokens=3, do_sample=False)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    handle = layer.register_forward_pre_hook(pause)
    worker = threading.Thread(target=run)
    worker.start()
    assert entered.wait(10)
    return worker, release, result, handle


@pytest.mark.parametrize("method", ["fastv", "snapkv", "infllm"])
def test_second_thread_is_refused_while_a_forward_runs(llama_text, method):
    model = llama_text
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    attach = (lambda: apply_quiet(model, k=1, ratio=0.5, image_token_start_index=5, image_token_length=20)) if method == "fastv" else (
        lambda: me.apply(model, method, **(MEMORY if method == "infllm" else dict(ratio=0.5))))
    with attach():
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=3, do_sample=False)
        worker, release, result, handle = _held_forward(model, model.model.layers[1], ids)
        try:
            with pytest.raises(RuntimeError, match="another thread.*one model.*per thread"):
                with torch.no_grad():
                    model(ids)
        finally:
            release.set()
            worker.join(10)
            handle.remove()
        assert "error" not in result, result.get("error")
        assert torch.equal(result["out"], ref)
        with torch.no_grad():  # the refusal left no state behind: this thread may use the model now
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), ref)


def test_sequential_use_from_two_threads_is_fine(llama_text):
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    outs = []
    with me.apply(llama_text, "snapkv", ratio=0.5):
        for _ in range(2):
            t = threading.Thread(target=lambda: outs.append(llama_text.generate(ids, max_new_tokens=2,
                                                                                do_sample=False)))
            t.start()
            t.join(10)
    assert len(outs) == 2 and torch.equal(outs[0], outs[1])
