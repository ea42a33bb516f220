"""Shared fixtures for the FastV test suite.

Models are tiny random-weight builds from `mllm_efficiency.testing` (seeded, CPU). The session-scoped
models are shared between tests, so every test must detach what it attaches: use the `attach` fixture
(detaches at teardown) or `with me.apply(...)`. An autouse guard fails a test that leaves anything of a method
(any family's engine, the ModelContext, a switched attention implementation, a registry entry) on a model fixture.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # CPU runs test the Triton kernels (video/dedup_kernels.py) under Triton's interpreter, which must be chosen
    # before triton is first imported; the library itself only runs them on CUDA tensors unless asked to
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mllm_efficiency as me
from mllm_efficiency.testing import IMAGE_TOKEN, llava_prompt, tiny_llama_lm, tiny_llava, tiny_qwen2_lm  # noqa: F401

torch.set_num_threads(1)  # tiny models gain nothing from threads; a loaded 2-core box loses a lot

NUM_LAYERS = 4
ENGINE_ATTR = "_mllm_eff_pruning_engine"  # where the library keeps its engine (checked by the leak guard)


def keep_rule(n: int, ratio: float) -> int:
    """The spec's keep rule, written out here: clamp(round(N * (1 - R)), 1, N), Python round."""
    if n == 0:
        return 0
    return min(n, max(1, round(n * (1 - ratio))))


def _cache_kwarg() -> str:
    import inspect
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


# the cache argument's name: `cache` from transformers 5.24, `past_key_values` before
CACHE_KW = _cache_kwarg()


def cache_of(out):
    """The KV cache of a model output (transformers 5.24 names it `cache`, earlier 5.x `past_key_values`)."""
    c = getattr(out, "cache", None)
    if c is None:
        c = out["past_key_values"]
    return c


def text_model_of(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def text_impl(model) -> str:
    return text_model_of(model).config._attn_implementation


def pad_left(seqs, pad_id: int = 0):
    """Left-pad 1-row id tensors into one batch; returns (input_ids, attention_mask)."""
    L = max(s.shape[1] for s in seqs)
    ids, mask = [], []
    for s in seqs:
        n = L - s.shape[1]
        ids.append(torch.cat([torch.full((1, n), pad_id, dtype=torch.long), s], 1))
        mask.append(torch.cat([torch.zeros(1, n, dtype=torch.long), torch.ones_like(s)], 1))
    return torch.cat(ids), torch.cat(mask)


def greedy(model, max_new_tokens: int = 4, **inputs) -> torch.Tensor:
    """Greedy generate; returns only the new tokens."""
    L = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return out[:, L:]


def apply_quiet(model, **cfg):
    """me.apply(model, 'fastv', ...) without the mode='mask' no-speedup warning reaching the output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return me.apply(model, "fastv", **cfg)



def family_models(builders: dict, num_layers: int):
    """get(family, impl="sdpa"): a tiny model of `family` built once; other attention implementations get the
    sdpa model's weights, so the two compare like for like."""
    built = {}

    def get(family, impl="sdpa"):
        if (family, impl) not in built:
            m = builders[family](num_layers=num_layers, attn_implementation=impl)
            if impl != "sdpa":
                m.load_state_dict(get(family).state_dict())
            built[(family, impl)] = m
        return built[(family, impl)]

    return get

@pytest.fixture(scope="session")
def llava():
    """Tiny LLaVA (4-layer Llama text model, sdpa), 16 image tokens per 32x32 image, image token 127."""
    return tiny_llava(num_layers=NUM_LAYERS, attn_implementation="sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    """Same weights as `llava` (same seed), eager attention."""
    return tiny_llava(num_layers=NUM_LAYERS, attn_implementation="eager")


@pytest.fixture(scope="session")
def qwen2():
    return tiny_qwen2_lm(num_layers=NUM_LAYERS)


@pytest.fixture(scope="session")
def llama_text():
    return tiny_llama_lm(num_layers=NUM_LAYERS)


@pytest.fixture(scope="session")
def prompt1():
    """One image: 3 text + 16 image + 3 text = 22 tokens; visual positions 3..18."""
    ids, pv = llava_prompt(num_images=1, seed=0)
    return dict(input_ids=ids, pixel_values=pv)


@pytest.fixture(scope="session")
def prompt2():
    """Two images with two text tokens between them: 3 + 16 + 2 + 16 + 3 = 40 tokens."""
    ids, pv = llava_prompt(num_images=2, seed=1)
    return dict(input_ids=ids, pixel_values=pv)


@pytest.fixture(scope="session")
def prompt3():
    """Three images (N = 48), 3 + 16 + 2 + 16 + 2 + 16 + 3 = 58 tokens."""
    ids, pv = llava_prompt(num_images=3, seed=2)
    return dict(input_ids=ids, pixel_values=pv)


@pytest.fixture
def attach():
    """attach(model, **cfg) -> handle; every handle is removed at teardown (even when the test fails)."""
    handles = []

    def _attach(model, **cfg):
        h = apply_quiet(model, **cfg)
        handles.append(h)
        return h

    yield _attach
    for h in reversed(handles):
        h.remove()




_OWN_MODULES = {"test_api", "test_fastv", "test_fastv_reference", "test_fastv_batch"}


@pytest.fixture(autouse=True)
def _no_grad(request):
    """Inference only in the FastV tests (other test modules in this folder are left alone)."""
    if request.module.__name__.rsplit(".", 1)[-1] in _OWN_MODULES:
        with torch.no_grad():
            yield
    else:
        yield


def library_registrations() -> set[str]:
    """Names the library registered in transformers' attention registries (fast decoding's slot kernels stay
    registered by design and are left out)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    names = set(AttentionInterface._global_mapping) | set(AttentionMaskInterface._global_mapping)
    return {n for n in names if n.startswith("mllm_eff_") and not n.startswith("mllm_eff_slots")}


def model_state(model) -> dict:
    """Everything a method attaches, per submodule: hook ids, `_mllm_eff*` attributes, submodule identities;
    plus every attention implementation and the library's registry entries."""
    state = {}
    for name, m in model.named_modules():
        state[name] = (tuple(m._forward_pre_hooks), tuple(m._forward_hooks),
                       tuple(sorted(k for k in vars(m) if k.startswith("_mllm_eff"))),
                       tuple((k, id(c)) for k, c in m._modules.items()),
                       getattr(getattr(m, "config", None), "_attn_implementation", None))
    state["<registry>"] = library_registrations()
    return state


def _leaks(model) -> list[str]:
    from mllm_efficiency.core import composition

    found = []
    for name, m in model.named_modules():
        found += [f"{name or 'model'}.{k}" for k in vars(m) if k.startswith("_mllm_eff")]
        impl = getattr(getattr(m, "config", None), "_attn_implementation", None) or ""
        if impl.startswith("mllm_eff_"):
            found.append(f"{name or 'model'}.config._attn_implementation={impl}")
    tm = text_model_of(model) if hasattr(model, "model") else model
    found += [f"composition record {n}" for n in composition.attached_methods(tm)]
    return found


@pytest.fixture(autouse=True)
def _no_leaked_hooks(request):
    """Fail loudly if a test leaves any method (engine, ModelContext, attention hub, memory engine, switched
    attention implementation) on a model fixture, or a registration in the attention registry."""
    registry = library_registrations()
    yield
    for name in request.fixturenames:
        try:
            value = request.getfixturevalue(name)
        except Exception:  # noqa: BLE001 - fixtures that failed to set up report themselves
            continue
        if isinstance(value, torch.nn.Module) and hasattr(value, "config"):
            leaks = _leaks(value)
            assert not leaks, f"{request.node.name} left {leaks} on {name}"
    assert library_registrations() <= registry, (
        f"{request.node.name} left {sorted(library_registrations() - registry)} in the attention registry")


__all__ = ["IMAGE_TOKEN", "keep_rule", "cache_of", "pad_left", "greedy", "apply_quiet", "text_impl"]


@pytest.fixture(scope="module")
def ov():
    """Tiny LLaVA-OneVision (4 layers) for the video tests; one per test module."""
    from mllm_efficiency.testing import tiny

    return tiny.tiny_llava_onevision(num_layers=4)


@pytest.fixture(scope="module")
def ov_prompt(ov):
    """An 8-frame video prompt for `ov`."""
    from mllm_efficiency.testing import tiny

    return tiny.onevision_video_prompt(ov, frames=8)


def load_script(relative_path: str):
    """A repository script (e.g. "benchmarks/video/bench_video.py") imported as a module named after its file;
    registered in sys.modules so dataclasses defined in it resolve their module."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
