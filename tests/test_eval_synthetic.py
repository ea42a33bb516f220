"""Synthetic shapes benchmark: deterministic, answers consistent with the scene, scoring, task folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mllm_efficiency.errors import ConfigError
from mllm_efficiency.eval import synthetic as S
from mllm_efficiency.eval.tasks import write_task_dir


def test_generator_is_deterministic_and_splits_differ():
    a = S.make_samples(20, seed=3, split="test")
    b = S.make_samples(20, seed=3, split="test")
    assert a == b
    assert [np.asarray(S.render(x)).tobytes() for x in a[:5]] == [np.asarray(S.render(x)).tobytes() for x in b[:5]]
    assert S.make_samples(20, seed=3, split="train") != a
    assert S.make_samples(20, seed=4, split="test") != a
    assert S.make_sample(7, seed=3) == a[7]  # index addressable, independent of the batch it was made in


def _count_colour(img, colour):
    arr = np.asarray(img).reshape(-1, 3)
    return int((arr == np.array(S.COLOURS[colour])).all(1).sum())


def test_answers_follow_from_the_scene():
    for s in S.make_samples(80, seed=1):
        objs = s.shapes
        if s.qtype == "count":
            colour = s.question.split()[2]
            assert int(s.answer) == sum(o.colour == colour for o in objs)
        elif s.qtype == "exist":
            _, _, _, colour, shape = s.question.rstrip("?").split()
            assert (s.answer == "yes") == any(o.colour == colour and o.shape == shape for o in objs)
        elif s.qtype == "colour":
            assert s.answer in S.COLOURS and any(o.colour == s.answer for o in objs)
        else:
            assert s.answer in ("yes", "no")
        img = S.render(s)
        for o in objs:  # every shape is drawn in its colour
            assert _count_colour(img, o.colour) > 20


def test_video_sample_moves_the_named_shape():
    s = S.make_video_sample(2, frames=4)
    frames = S.render_frames(s)
    assert len(frames) == 4 and s.answer in S.VIDEO_DIRECTIONS
    colour = s.shapes[0].colour
    centres = []
    for f in frames:
        ys, xs = np.nonzero((np.asarray(f) == np.array(S.COLOURS[colour])).all(-1))
        centres.append((xs.mean(), ys.mean()))
    dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
    expected = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}
    assert expected[s.answer]


def test_scoring_and_errors():
    assert S.exact_match(" Red.", "red") == 1.0
    assert S.exact_match("two shapes", "2") == 1.0
    assert S.exact_match("blue", "red") == 0.0
    assert S.exact_match("", "red") == 0.0
    with pytest.raises(ConfigError, match="split"):
        S.make_sample(0, split="dev")
    with pytest.raises(ConfigError, match="index"):
        S.make_sample(-1)
    with pytest.raises(ConfigError, match="frames"):
        S.make_video_sample(0, frames=1)


def test_task_folder_roundtrip(tmp_path):
    root = write_task_dir(tmp_path, tasks=("shapes_vqa",), n=5, seed=2)
    yaml_text = (root / "shapes_vqa" / "shapes_vqa.yaml").read_text()
    assert "exact_match" in yaml_text and "!function utils.doc_to_visual" in yaml_text
    docs = [json.loads(line) for line in (root / "shapes_vqa" / "shapes_vqa.jsonl").read_text().splitlines()]
    assert [S.Sample.from_json(d) for d in docs] == S.make_samples(5, seed=2)
    from mllm_efficiency.eval.lmms_task import doc_to_text, doc_to_visual, process_results

    assert doc_to_text(docs[0]).startswith(docs[0]["question"])
    assert np.array_equal(np.asarray(doc_to_visual(docs[0])[0]), np.asarray(S.render(S.make_sample(0, seed=2))))
    assert process_results(docs[0], [docs[0]["answer"].upper() + "."]) == {"exact_match": 1.0}
