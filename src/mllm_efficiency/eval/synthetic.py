"""Synthetic visual QA ("shapes"): scenes of coloured shapes on a 3x3 grid, questions that need the image.

Every sample is a pure function of (seed, split, index): `make_sample` builds a scene and one question from a
private `random.Random`, and `render` draws the scene with PIL. The same call always gives the same image and
answer, so the benchmark is regenerated instead of stored.

Question types (answers are one lower-case word):
  colour    "What color is the shape at the top left?"         -> red / green / blue / yellow / purple
  count     "How many blue shapes are there?"                  -> 0 .. 4
  exist     "Is there a green circle?"                          -> yes / no (balanced)
  relpos    "Is the red square left of the blue circle?"        -> yes / no (balanced; also above / below / right)
Video samples (`make_video_sample`, 8 frames by default; the type cycles with the index like the image types):
  motion       "Which way does the red circle move? ..."            -> left / right / up / down
  mover        "What color is the shape that moves?"                -> a colour (or, every other sample, "What kind
               of shape moves?" -> circle / square / triangle); the other shapes stand still
  first_frame  "In which frame does the red circle first appear?"   -> 1 .. frames (it stays until the last frame)
  frame_count  "In how many frames is the red circle visible?"      -> 1 .. frames (one contiguous run of frames)
Answers are balanced exactly: each type's answer cycles with the sample index. Other shapes appear and disappear
too (distractors), so frames and positions matter; what does not change between frames stays pixel-identical
(temporal redundancy for the video methods).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Iterable

from ..errors import ConfigError

IMAGE_SIZE = 96
GRID = 3
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7, "large": 12}
BACKGROUND = (235, 235, 235)
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
QUESTION_TYPES = ("colour", "count", "exist", "relpos")
SPLITS = ("train", "val", "test")
MAX_OBJECTS = 5
VIDEO_DIRECTIONS = ("left", "right", "up", "down")
VIDEO_QUESTION_TYPES = ("motion", "mover", "first_frame", "frame_count")
VIDEO_FRAMES = 8


@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    row: int
    col: int
    dx: int = 0  # jitter of the centre inside its cell, pixels
    dy: int = 0


@dataclasses.dataclass(frozen=True)
class Sample:
    question_id: str
    qtype: str
    question: str
    answer: str
    shapes: tuple[Shape, ...]
    frames: int = 1          # > 1: a video; shape 0 moves by `motion` pixels per frame
    motion: tuple[int, int] = (0, 0)
    # video: per shape, the (first, last) frame (0-based, inclusive) it is drawn in; empty = every shape always
    visible: tuple[tuple[int, int], ...] = ()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shapes"] = [dataclasses.asdict(s) for s in self.shapes]
        d["motion"] = list(self.motion)
        if self.visible:
            d["visible"] = [list(v) for v in self.visible]
        else:  # image samples (and always-visible clips) keep their earlier JSON
            del d["visible"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Sample":
        d = dict(d)
        d["shapes"] = tuple(Shape(**s) for s in d["shapes"])
        # a datasets/arrow row fills a key that other rows lack with None
        d["motion"] = tuple(d.get("motion") or (0, 0))
        d["visible"] = tuple(tuple(v) for v in d.get("visible") or ())
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})

    def shown(self, i: int, frame: int) -> bool:
        """Whether shape `i` is drawn in `frame`."""
        if not self.visible:
            return True
        first, last = self.visible[i]
        return first <= frame <= last


def _rng(seed: int, split: str, index: int, kind: str = "image") -> random.Random:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not isinstance(index, int) or index < 0:
        raise ConfigError(f"index must be an integer >= 0, got {index!r}")
    digest = hashlib.sha256(f"shapes|{kind}|{seed}|{split}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _place(rng: random.Random, n: int) -> list[Shape]:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return [Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)), r, c,
                  rng.randint(-3, 3), rng.randint(-3, 3)) for r, c in cells]


def _cell_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"in the middle {COLS[col]}"
    return f"at the {ROWS[row]} {COLS[col]}"


def _unique(shapes: Iterable[Shape]) -> list[Shape]:
    """Shapes whose (colour, shape) pair occurs once, so a question can name them unambiguously."""
    shapes = list(shapes)
    key = [(s.colour, s.shape) for s in shapes]
    return [s for s, k in zip(shapes, key) if key.count(k) == 1]


def _question(rng: random.Random, qtype: str, shapes: list[Shape]) -> tuple[str, str] | None:
    if qtype == "colour":
        s = rng.choice(shapes)
        return f"What color is the shape {_cell_name(s.row, s.col)}?", s.colour
    if qtype == "count":
        colour = rng.choice(list(COLOURS))
        return f"How many {colour} shapes are there?", str(sum(s.colour == colour for s in shapes))
    if qtype == "exist":
        present = {(s.colour, s.shape) for s in shapes}
        want_yes = rng.random() < 0.5
        pool = sorted(present) if want_yes else sorted({(c, s) for c in COLOURS for s in SHAPES} - present)
        colour, shape = rng.choice(pool)
        return f"Is there a {colour} {shape}?", "yes" if want_yes else "no"
    if qtype == "relpos":
        uniq = _unique(shapes)
        rng.shuffle(uniq)
        for a in uniq:
            for b in uniq:
                if a is b:
                    continue
                relations = []
                if a.col != b.col:
                    relations += [("left of", a.col < b.col), ("right of", a.col > b.col)]
                if a.row != b.row:
                    relations += [("above", a.row < b.row), ("below", a.row > b.row)]
                if not relations:
                    continue
                want_yes = rng.random() < 0.5
                choices = [r for r in relations if r[1] == want_yes] or relations
                word, truth = rng.choice(choices)
                return (f"Is the {a.colour} {a.shape} {word} the {b.colour} {b.shape}?", "yes" if truth else "no")
        return None
    raise ConfigError(f"qtype must be one of {list(QUESTION_TYPES)}, got {qtype!r}")


def make_sample(index: int, seed: int = 0, split: str = "test", qtype: str | None = None) -> Sample:
    """Sample `index` of `split`: a scene of 1..5 shapes and one question (type cycles unless `qtype`)."""
    rng = _rng(seed, split, index)
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)] if qtype is None else qtype
    if qtype not in QUESTION_TYPES:
        raise ConfigError(f"qtype must be one of {list(QUESTION_TYPES)}, got {qtype!r}")
    while True:  # relpos needs two distinguishable shapes; redraw the scene until it has them
        low = 2 if qtype == "relpos" else 1
        shapes = _place(rng, rng.randint(low, MAX_OBJECTS))
        qa = _question(rng, qtype, shapes)
        if qa is not None:
            break
    return Sample(f"{split}-{seed}-{index}", qtype, qa[0], qa[1], tuple(shapes))


def make_samples(n: int, seed: int = 0, split: str = "test", start: int = 0) -> list[Sample]:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (number of samples) must be an integer >= 1, got {n!r}")
    return [make_sample(start + i, seed, split) for i in range(n)]


def _check_frames(frames) -> None:
    if not isinstance(frames, int) or isinstance(frames, bool) or not 2 <= frames <= 16:
        raise ConfigError(f"frames must be an integer in [2, 16], got {frames!r}")


def _moving(shape: Shape, direction: str, frames: int) -> tuple[Shape, tuple[int, int]]:
    """The shape restarted at the far side of its cell, and its motion (pixels per frame) towards `direction`."""
    step = max(1, 24 // (frames - 1))
    motion = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[direction]
    sx = -12 if motion[0] > 0 else (12 if motion[0] < 0 else 0)
    sy = -12 if motion[1] > 0 else (12 if motion[1] < 0 else 0)
    return dataclasses.replace(shape, dx=sx, dy=sy), motion


def _distractor_spans(rng: random.Random, n: int, frames: int) -> list[tuple[int, int]]:
    """Visible frame ranges of `n` distractors: half always there, the others a random contiguous run."""
    spans = []
    for _ in range(n):
        if rng.random() < 0.5:
            spans.append((0, frames - 1))
        else:
            a = rng.randrange(frames)
            spans.append((a, rng.randrange(a, frames)))
    return spans


def make_video_sample(index: int, seed: int = 0, split: str = "test", frames: int = VIDEO_FRAMES,
                      qtype: str | None = None) -> Sample:
    """Clip `index` of `split`: `frames` frames and one question (type cycles with the index unless `qtype`; see
    the module docstring). Shape 0 is the one asked about. The answer of each type cycles with index // 4, so every
    type's answers are balanced over consecutive indices."""
    _check_frames(frames)
    qtype = VIDEO_QUESTION_TYPES[index % len(VIDEO_QUESTION_TYPES)] if qtype is None else qtype
    if qtype not in VIDEO_QUESTION_TYPES:
        raise ConfigError(f"qtype must be one of {list(VIDEO_QUESTION_TYPES)}, got {qtype!r}")
    rng = _rng(seed, split, index, kind="video")
    turn = index // len(VIDEO_QUESTION_TYPES)
    qid = f"video-{split}-{seed}-{index}"
    if qtype == "motion":  # kept as before: one moving shape among 1..3 distinguishable ones, all always visible
        shapes = _unique(_place(rng, rng.randint(1, 3)))
        while not shapes:
            shapes = _unique(_place(rng, rng.randint(1, 3)))
        direction = VIDEO_DIRECTIONS[turn % len(VIDEO_DIRECTIONS)]
        shapes[0], motion = _moving(shapes[0], direction, frames)
        q = f"Which way does the {shapes[0].colour} {shapes[0].shape} move? Answer left, right, up or down."
        return Sample(qid, qtype, q, direction, tuple(shapes), frames, motion)
    if qtype == "mover":  # shape 0 moves, 1..3 others stand still; the asked attribute names the mover alone
        by_shape = turn % 2 == 1
        want = SHAPES[(turn // 2) % len(SHAPES)] if by_shape else list(COLOURS)[(turn // 2) % len(COLOURS)]
        attr = "shape" if by_shape else "colour"
        while True:
            shapes = _place(rng, rng.randint(2, 4))
            shapes[0] = dataclasses.replace(shapes[0], **{attr: want})
            if all(getattr(s, attr) != want for s in shapes[1:]):
                break
        shapes[0], motion = _moving(shapes[0], rng.choice(VIDEO_DIRECTIONS), frames)
        q = ("What kind of shape moves? Answer circle, square or triangle." if by_shape
             else "What color is the shape that moves?")
        return Sample(qid, qtype, q, want, tuple(shapes), frames, motion)
    # first_frame / frame_count: nothing moves; shape 0 (named by a unique colour + shape) is shown in a run of
    # frames, the distractors in theirs
    if qtype == "first_frame":  # appears in frame `first` and stays to the end
        first = turn % frames
        span = (first, frames - 1)
        q = f"In which frame does the {{}} first appear? Answer a number from 1 to {frames}."
        answer = str(first + 1)
    else:  # visible in `count` consecutive frames, anywhere in the clip
        count = turn % frames + 1
        a = rng.randint(0, frames - count)
        span = (a, a + count - 1)
        q = f"In how many frames is the {{}} visible? Answer a number from 1 to {frames}."
        answer = str(count)
    while True:
        shapes = _place(rng, rng.randint(1, 4))
        if shapes[0] in _unique(shapes):
            break
    visible = (span, *_distractor_spans(rng, len(shapes) - 1, frames))
    q = q.format(f"{shapes[0].colour} {shapes[0].shape}")
    return Sample(qid, qtype, q, answer, tuple(shapes), frames, (0, 0), visible)


def make_video_samples(n: int, seed: int = 0, split: str = "test", start: int = 0, frames: int = VIDEO_FRAMES,
                       qtype: str | None = None) -> list[Sample]:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (number of samples) must be an integer >= 1, got {n!r}")
    return [make_video_sample(start + i, seed, split, frames, qtype) for i in range(n)]


def render(sample: Sample, frame: int = 0, image_size: int = IMAGE_SIZE):
    """PIL RGB image of the scene (of `frame` for a video sample)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / GRID
    scale = image_size / IMAGE_SIZE
    for i, s in enumerate(sample.shapes):
        if not sample.shown(i, frame):
            continue
        mx, my = (sample.motion[0] * frame, sample.motion[1] * frame) if i == 0 else (0, 0)
        cx = (s.col + 0.5) * cell + (s.dx + mx) * scale
        cy = (s.row + 0.5) * cell + (s.dy + my) * scale
        r = SIZES[s.size] * scale
        colour = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif s.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def render_frames(sample: Sample, image_size: int = IMAGE_SIZE) -> list:
    return [render(sample, f, image_size) for f in range(sample.frames)]


PROMPT_SUFFIX = "\nAnswer with one word."


def prompt_text(sample: Sample) -> str:
    """The text part of the prompt (the image comes before it)."""
    return sample.question + PROMPT_SUFFIX


_WORD = re.compile(r"[a-z0-9]+")
_NUMBERS = {w: str(i) for i, w in enumerate(("zero one two three four five six seven eight nine ten eleven twelve "
                                             "thirteen fourteen fifteen sixteen").split())}


def normalize_answer(text: str) -> str:
    """First word of a model's reply, lower-case, punctuation removed ("Red." -> "red", " 2 shapes" -> "2")."""
    words = _WORD.findall(str(text).lower())
    if not words:
        return ""
    return _NUMBERS.get(words[0], words[0])


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(s.to_json()) + "\n")
    return path
