"""Synthetic visual QA ("shapes"): scenes of coloured shapes on a 3x3 grid, questions that need the image.

Every sample is a pure function of (seed, split, index): `make_sample` builds a scene and one question from a
private `random.Random`, and `render` draws the scene with PIL. The same call always gives the same image and
answer, so the benchmark is regenerated instead of stored.

Question types (answers are one lower-case word):
  colour    "What color is the shape at the top left?"         -> red / green / blue / yellow / purple
  count     "How many blue shapes are there?"                  -> 0 .. 4
  exist     "Is there a green circle?"                          -> yes / no (balanced)
  relpos    "Is the red square left of the blue circle?"        -> yes / no (balanced; also above / below / right)
A video variant (`make_video_sample`) moves one shape across frames: "Which way does the red circle move?"
-> left / right / up / down.
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

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shapes"] = [dataclasses.asdict(s) for s in self.shapes]
        d["motion"] = list(self.motion)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Sample":
        d = dict(d)
        d["shapes"] = tuple(Shape(**s) for s in d["shapes"])
        d["motion"] = tuple(d.get("motion", (0, 0)))
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})


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


def make_video_sample(index: int, seed: int = 0, split: str = "test", frames: int = 4) -> Sample:
    """A short clip: shape 0 moves one direction by a few pixels per frame; the question asks which way."""
    if not isinstance(frames, int) or not 2 <= frames <= 16:
        raise ConfigError(f"frames must be an integer in [2, 16], got {frames!r}")
    rng = _rng(seed, split, index, kind="video")
    shapes = _unique(_place(rng, rng.randint(1, 3)))
    while not shapes:
        shapes = _unique(_place(rng, rng.randint(1, 3)))
    direction = rng.choice(VIDEO_DIRECTIONS)
    step = max(1, 24 // (frames - 1))
    motion = {"left": (-step, 0), "right": (step, 0), "up": (0, -step), "down": (0, step)}[direction]
    mover = shapes[0]
    # start the mover at the opposite side of its cell so it stays inside the image
    sx = -12 if motion[0] > 0 else (12 if motion[0] < 0 else 0)
    sy = -12 if motion[1] > 0 else (12 if motion[1] < 0 else 0)
    shapes[0] = dataclasses.replace(mover, dx=sx, dy=sy)
    q = f"Which way does the {mover.colour} {mover.shape} move? Answer left, right, up or down."
    return Sample(f"video-{split}-{seed}-{index}", "motion", q, direction, tuple(shapes), frames, motion)


def render(sample: Sample, frame: int = 0, image_size: int = IMAGE_SIZE):
    """PIL RGB image of the scene (of `frame` for a video sample)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / GRID
    scale = image_size / IMAGE_SIZE
    for i, s in enumerate(sample.shapes):
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


def normalize_answer(text: str) -> str:
    """First word of a model's reply, lower-case, punctuation removed ("Red." -> "red", " 2 shapes" -> "2")."""
    words = _WORD.findall(str(text).lower())
    if not words:
        return ""
    numbers = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
    return numbers.get(words[0], words[0])


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def write_jsonl(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in samples:
            f.write(json.dumps(s.to_json()) + "\n")
    return path
