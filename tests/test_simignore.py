"""SimIgnore: the walk over sorted image-text similarities, ratio 0, mask == drop, composition with FastV."""
import pytest
import torch

import mllm_efficiency as me
from mllm_efficiency.adapters import get_adapter
from mllm_efficiency.pruning.simignore import walk_keep
from mllm_efficiency.testing import llava_prompt, tiny_llava

from conftest import pad_left

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _walk_reference(S: torch.Tensor, keep: int, start: int, stride: int) -> set[int]:
    N, T = S.shape
    flat = sorted(((S[i, j].item(), i * T + j) for i in range(N) for j in range(T)), key=lambda x: -x[0])
    got: list[int] = []
    for _, idx in flat[start::stride]:
        if idx // T not in got:
            got.append(idx // T)
        if len(got) == keep:
            break
    return set(got)


@pytest.mark.parametrize("seed", range(30))
def test_walk_keep_matches_python_walk(seed):
    g = torch.Generator().manual_seed(seed)
    N, T = torch.randint(1, 25, (2,), generator=g).tolist()
    S = torch.randn(N, T, generator=g)
    keep = int(torch.randint(1, N + 1, (1,), generator=g))
    start, stride = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
    chosen = walk_keep(S, keep, start, stride)
    assert set(chosen.nonzero().flatten().tolist()) == _walk_reference(S, keep, start, stride)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def prompt():
    ids, pv = llava_prompt(num_images=2)
    return dict(input_ids=ids, pixel_values=pv)


def _inputs_embeds(model, prompt):
    """Sample 0's embeddings at the LLM input (the adapter stops the wrapper's forward there)."""
    return get_adapter(model).merged_inputs_embeds(**prompt)[0]


@torch.no_grad()
def test_ratio_zero_is_exact_and_remove_restores(model, prompt):
    base = model(**prompt).logits
    with me.apply(model, "simignore", ratio=0.0) as h:
        assert torch.equal(model(**prompt).logits, base)
        assert h.stats.keep_count == [32]
    with me.apply(model, "simignore", ratio=0.5):
        assert not torch.equal(model(**prompt).logits, base)
    assert torch.equal(model(**prompt).logits, base)


@pytest.mark.parametrize("text_source", ["text_after_image", "prompt"])
@torch.no_grad()
def test_kept_set_equals_reference(model, prompt, text_source):
    ids = prompt["input_ids"][0]
    emb = _inputs_embeds(model, prompt)
    visual = (ids == 127).nonzero().flatten()
    last = int(visual.max())
    text_pos = torch.arange(last + 1, len(ids)) if text_source == "text_after_image" else (ids != 127).nonzero().flatten()
    img = torch.nn.functional.normalize(emb[visual].float(), dim=-1)
    txt = torch.nn.functional.normalize(model.get_input_embeddings()(ids[text_pos]).float(), dim=-1)
    keep = round(32 * (1 - 0.3))
    expected = {int(visual[i]) for i in _walk_reference(img @ txt.T, keep, 1, 1)}
    with me.apply(model, "simignore", ratio=0.3, text_source=text_source) as h:
        model(**prompt)
        assert set(h.stats.kept_visual_positions[0].tolist()) == expected
        assert h.stats.keep_count == [keep] and h.stats.text_length == [len(text_pos)]


@torch.no_grad()
def test_mask_and_drop_agree(model, prompt):
    out = {}
    for action in ("mask", "drop"):
        with me.apply(model, "simignore", ratio=0.4, action=action) as h:
            logits = model(**prompt).logits[:, -1]
            gen = model.generate(**prompt, max_new_tokens=4, do_sample=False)
            out[action] = (logits, gen, h.stats.cache_lengths)
    assert (out["mask"][0] - out["drop"][0]).abs().max() < 1e-5
    assert torch.equal(out["mask"][1], out["drop"][1])
    n_drop = 32 - round(32 * 0.6)
    assert out["mask"][2] == [40] * 4 and out["drop"][2] == [40 - n_drop] * 4


@torch.no_grad()
def test_composes_with_fastv(model, prompt):
    with me.apply(model, "simignore", ratio=0.25) as h1, me.apply(model, "fastv", k=2, ratio=0.75) as h2:
        model(**prompt)
        # FastV keeps its own meaning: R of the prompt's 32 visual tokens, chosen among SimIgnore's survivors
        assert h1.stats.keep_count == [24] and h2.stats.keep_count == [8]
        assert set(h2.stats.kept_visual_positions[0].tolist()) <= set(h1.stats.kept_visual_positions[0].tolist())
        gen = model.generate(**prompt, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == prompt["input_ids"].shape[1] + 3


@torch.no_grad()
def test_explicit_text_and_span(model, prompt):
    with me.apply(model, "simignore", text_source="explicit", keep=20) as h:
        with pytest.raises(me.ConfigError, match="text_token_ids"):
            model(**prompt)
        h.set_text([10, 11, 12])
        model(**prompt)
        assert h.stats.keep_count == [20] and h.stats.text_length == [3]
    with me.apply(model, "simignore", text_source="explicit", text_token_ids=(10, 11, 12), keep=20) as h2:
        model(**prompt)
        assert h2.stats.kept_visual_positions[0].tolist() == h.stats.kept_visual_positions[0].tolist()
    with me.apply(model, "simignore", text_source="span", text_span_start=0, text_span_length=3, keep=10) as h3:
        model(**prompt)
        assert h3.stats.text_length == [3]


@pytest.mark.parametrize("bad", [dict(ratio=1.0), dict(keep=0), dict(action="x"), dict(text_source="span"),
                                 dict(stride=0), dict(text_token_ids=())])
def test_bad_config(model, bad):
    with pytest.raises(me.ConfigError):
        me.apply(model, "simignore", **bad)


@torch.no_grad()
def test_left_padded_batch_equals_single_runs(model):
    a_ids, a_pv = llava_prompt(1, suffix=(12, 13, 14, 15, 16), seed=1)
    b_ids, b_pv = llava_prompt(2, seed=2)
    ids, am = pad_left([a_ids, b_ids])
    with me.apply(model, "simignore", ratio=0.3) as h:
        batch = model(input_ids=ids, attention_mask=am, pixel_values=torch.cat([a_pv, b_pv])).logits[:, -1]
        kept_batch = [p.tolist() for p in h.stats.kept_visual_positions]
        single_a = model(input_ids=a_ids, pixel_values=a_pv).logits[:, -1]
        kept_a = h.stats.kept_visual_positions[0].tolist()
        single_b = model(input_ids=b_ids, pixel_values=b_pv).logits[:, -1]
        kept_b = h.stats.kept_visual_positions[0].tolist()
    pad_a = ids.shape[1] - a_ids.shape[1]
    assert [p - pad_a for p in kept_batch[0]] == kept_a and kept_batch[1] == kept_b
    assert (batch[0] - single_a[0]).abs().max() < 1e-4 and (batch[1] - single_b[0]).abs().max() < 1e-4
