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


def _centre(img, colour):
    ys, xs = np.nonzero((np.asarray(img) == np.array(S.COLOURS[colour])).all(-1))
    return (xs.mean(), ys.mean()) if len(xs) else None


def test_video_sample_moves_the_named_shape():
    s = S.make_video_sample(0, frames=4)
    assert s.qtype == "motion"
    frames = S.render_frames(s)
    assert len(frames) == 4 and s.answer in S.VIDEO_DIRECTIONS
    centres = [_centre(f, s.shapes[0].colour) for f in frames]
    dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
    expected = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}
    assert expected[s.answer]


def test_video_samples_default_to_8_frames_four_kinds_balanced_and_deterministic():
    clips = S.make_video_samples(160, seed=1)
    assert clips == S.make_video_samples(160, seed=1)
    assert S.make_video_sample(37, seed=1) == clips[37]
    assert clips != S.make_video_samples(160, seed=1, split="train")
    assert all(c.frames == S.VIDEO_FRAMES == 8 for c in clips)
    assert [c.qtype for c in clips[:4]] == list(S.VIDEO_QUESTION_TYPES)
    answers = {q: [c.answer for c in clips if c.qtype == q] for q in S.VIDEO_QUESTION_TYPES}
    assert sorted(set(answers["motion"])) == sorted(S.VIDEO_DIRECTIONS)
    assert all(answers["motion"].count(d) == 10 for d in S.VIDEO_DIRECTIONS)
    for q in ("first_frame", "frame_count"):
        assert all(answers[q].count(str(k)) == 5 for k in range(1, 9)), q
    assert set(answers["mover"]) == set(S.COLOURS) | set(S.SHAPES)
    for c in clips:  # one word, JSON round trip
        assert len(c.answer.split()) == 1 and S.Sample.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_video_answers_follow_from_the_rendered_frames():
    for c in S.make_video_samples(24, seed=2, frames=8):
        frames = [np.asarray(f) for f in S.render_frames(c)]
        if c.qtype in ("first_frame", "frame_count"):
            target = c.shapes[0]
            # the named shape is the only one of its colour and kind; it is drawn exactly in its visible frames
            shown = [k for k in range(c.frames) if c.shown(0, k)]
            others_same = [i for i, o in enumerate(c.shapes) if i and o.colour == target.colour]
            for k in range(c.frames):  # its colour appears at its cell only in the frames where it is shown
                y = int((target.row + 0.5) * 32 + target.dy)
                x = int((target.col + 0.5) * 32 + target.dx)
                drawn = (frames[k][y, x] == np.array(S.COLOURS[target.colour])).all()
                assert drawn == (k in shown) or others_same
            expected = shown[0] + 1 if c.qtype == "first_frame" else len(shown)
            assert int(c.answer) == expected
            if c.qtype == "first_frame":
                assert shown[-1] == c.frames - 1  # it stays once it appears
        elif c.qtype == "mover":
            assert c.motion != (0, 0)
            attr = "shape" if c.answer in S.SHAPES else "colour"
            assert getattr(c.shapes[0], attr) == c.answer
            assert all(getattr(o, attr) != c.answer for o in c.shapes[1:])
            # only the mover changes pixels between frames
            diff = (frames[0] != frames[-1]).any(-1)
            ys, xs = np.nonzero(diff)
            cx, cy = xs.mean() / 32, ys.mean() / 32
            assert abs(cx - (c.shapes[0].col + 0.5)) < 1 and abs(cy - (c.shapes[0].row + 0.5)) < 1


PINNED_IMAGE_SAMPLES = [
    ("colour", "What color is the shape in the center?", "green", 1),
    ("count", "How many yellow shapes are there?", "1", 5),
    ("exist", "Is there a yellow square?", "no", 4),
    ("relpos", "Is the blue circle below the purple circle?", "no", 3)]


def test_image_samples_are_unchanged():
    """The image task's questions are pinned: the video changes must not move them."""
    got = [(s.qtype, s.question, s.answer, len(s.shapes)) for s in S.make_samples(4, seed=0)]
    assert got == PINNED_IMAGE_SAMPLES
    assert "visible" not in S.make_sample(0).to_json()


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
    with pytest.raises(ConfigError, match="qtype"):
        S.make_video_sample(0, qtype="colour")
    assert S.normalize_answer("Eight.") == "8"


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


def test_video_task_rows_read_back_through_datasets(tmp_path):
    """lmms-eval reads the task's JSON lines with `datasets`, which fills keys other rows lack (a clip's `visible`
    when every shape is always shown) with None: every row must still rebuild its sample."""
    datasets = pytest.importorskip("datasets")
    from mllm_efficiency.eval.tasks import task_samples

    root = write_task_dir(tmp_path, tasks=("shapes_video",), n=12, seed=0)
    rows = datasets.load_dataset("json", data_files=str(root / "shapes_video" / "shapes_video.jsonl"),
                                 split="train")
    assert any(r["visible"] is None for r in rows) and any(r["visible"] is not None for r in rows)
    assert [S.Sample.from_json(r) for r in rows] == task_samples("shapes_video", 12, 0)
