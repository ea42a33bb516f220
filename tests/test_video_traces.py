"""Focus sparse traces: lean -> reference round trip, bit-identical regeneration, CSVs, video file input."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mllm_efficiency.video import trace as TR
from mllm_efficiency.video.tracegen import generate_traces


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    return generate_traces("tiny-onevision", "synthetic", 3, a, seed=7), \
        generate_traces("tiny-onevision", "synthetic", 3, b, seed=7), a, b


def test_traces_regenerate_bit_identically(traces):
    ra, rb, a, b = traces
    assert ra["median_index"] == rb["median_index"]
    for name in ("trace.safetensors", "meta.json"):
        fa = a / "focus_main" / "tiny-onevision_synthetic" / name
        fb = b / "focus_main" / "tiny-onevision_synthetic" / name
        assert _digest(fa) == _digest(fb)
    for csv in ("meta_data.csv", "adaptiv_sparsity.csv", "cmc_sparsity.csv"):
        assert (a / csv).read_bytes() == (b / csv).read_bytes()


def test_median_sample_recorded(traces):
    ra, _, a, _ = traces
    s = ra["sparsities"]
    assert s[ra["median_index"]] == sorted(s)[1]
    header, row = (a / "meta_data.csv").read_text().splitlines()
    assert header == ",".join(TR.META_HEADER) and row.endswith(f",{ra['median_index']}")


def test_lean_trace_round_trips_to_the_reference_dict():
    import mllm_efficiency as me
    from mllm_efficiency.video.tracegen import build_model, synthetic_sample

    model = build_model("tiny-onevision")
    p = synthetic_sample("tiny-onevision", model, 0, 3)
    with torch.no_grad(), me.apply(model, "focus", selected_layers=(0, 1), alpha_list=(0.6, 0.3),
                                   similarity_threshold=0.4, record_trace=True, vector_size=16) as h:
        model(**p)
        att = h._attached
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            TR.write_lean_trace(d, att, {"model": "tiny", "dataset": "synthetic"})
            ref = TR.to_reference(d)
        n_grid = att.layout_source.layout.n_grid[0]
        for (gemm, layer), root in att.trace.roots.items():
            n_vec = root.shape[1]
            expected_group = (root * n_vec + torch.arange(n_vec)).to(torch.int32)
            assert torch.equal(ref["group_idx"][gemm][layer, 0], expected_group)
            zero, sim = ref["mask_zero"][gemm][layer, 0], ref["mask_similar"][gemm][layer, 0]
            assert not bool((zero & sim).any())
            total = zero.sum() + sim.sum()
            s, z, t = h.stats.sic_counts[(gemm, layer)]
            assert (int(sim.sum()), int(zero.sum()), n_grid * n_vec) == (s, z, t) and total > 0
        # SEC: pruned tokens appear as all-zero rows from the layer after the selected one
        kept = att.trace.kept[0].long()
        dropped = torch.ones(n_grid, dtype=torch.bool)
        dropped[kept] = False
        assert bool(ref["mask_zero"]["q_proj"][1, 0][dropped].all())


def test_sample_frames_uniformly_from_a_video_file(tmp_path):
    av = pytest.importorskip("av")
    from mllm_efficiency.video.io import sample_frames, uniform_indices

    path = tmp_path / "tiny.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(20):
            img = np.full((32, 32, 3), i * 12, dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    frames = sample_frames(str(path), 4)
    assert frames.shape == (4, 32, 32, 3)
    idx = uniform_indices(20, 4)
    assert idx == [2, 7, 12, 17]
    means = frames.reshape(4, -1).mean(1)
    assert np.allclose(means, [i * 12 for i in idx], atol=6)
    with pytest.raises(ValueError, match="num_frames"):
        uniform_indices(20, 0)


def test_processor_inputs_give_the_sampled_frames_to_the_processor(monkeypatch):
    """`processor_inputs` hands the uniformly sampled frames, as one video, to the model's processor."""
    from mllm_efficiency.video import io

    frames = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    monkeypatch.setattr(io, "sample_frames", lambda path, n: frames[:n])
    seen = {}

    def processor(**kwargs):
        seen.update(kwargs)
        return {"pixel_values_videos": kwargs["videos"][0]}

    out = io.processor_inputs(processor, "clip.mp4", 3, "<video> what happens?")
    assert seen["text"] == "<video> what happens?" and seen["return_tensors"] == "pt"
    assert len(seen["videos"]) == 1 and np.array_equal(seen["videos"][0], frames[:3])
    assert out["pixel_values_videos"].shape == (3, 2, 2, 3)
