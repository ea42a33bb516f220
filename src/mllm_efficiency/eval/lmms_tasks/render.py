"""Drawing for the synthetic documents of `mllm_efficiency.eval.lmms_tasks`: scenes of shapes (the shapes benchmark's
renderer), text rendered with PIL's bundled FreeType font (so OCR questions have a true answer: the text asked
about is drawn in the image), documents, bar charts, labelled diagrams and short videos (mp4, PyAV)."""
from __future__ import annotations

import functools
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .. import synthetic

WHITE, BLACK = (255, 255, 255), (20, 20, 20)


@functools.lru_cache(maxsize=32)
def font(size: int):
    """PIL's bundled scalable font (the same glyphs on every machine); the bitmap default when FreeType is
    missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def scene(shapes, size: int = 336) -> Image.Image:
    """A shapes scene (`synthetic.Shape`s on the 3x3 grid) at `size` pixels."""
    return synthetic.render(synthetic.Sample("x", "scene", "", "", tuple(shapes)), image_size=size)


def random_scene(rng: random.Random, low: int = 1, high: int = synthetic.MAX_OBJECTS):
    return synthetic._place(rng, rng.randint(low, high))  # noqa: SLF001  (the benchmark's own placement)


def text_image(lines, size=(336, 160), fsize: int = 32, bg=WHITE, fg=BLACK, rotate: float = 0.0) -> Image.Image:
    """Lines of text centred on a plain background (optionally rotated: "irregular" text)."""
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    f = font(fsize)
    lines = [lines] if isinstance(lines, str) else list(lines)
    heights = [draw.textbbox((0, 0), ln, font=f)[3] for ln in lines]
    y = (size[1] - sum(heights) - 8 * (len(lines) - 1)) / 2
    for ln, h in zip(lines, heights):
        w = draw.textlength(ln, font=f)
        draw.text(((size[0] - w) / 2, y), ln, fill=fg, font=f)
        y += h + 8
    if rotate:
        img = img.rotate(rotate, expand=False, fillcolor=bg)
    return img


def sign(word: str, colour: str, shapes=(), size: int = 336) -> Image.Image:
    """A scene with a coloured sign in its upper half carrying `word` (a TextVQA-like photo)."""
    img = scene(shapes, size)
    draw = ImageDraw.Draw(img)
    f = font(size // 9)
    w = draw.textlength(word, font=f)
    box = [(size - w) / 2 - 12, size * 0.06, (size + w) / 2 + 12, size * 0.06 + size // 9 + 18]
    draw.rectangle(box, fill=synthetic.COLOURS[colour], outline=BLACK, width=2)
    draw.text((box[0] + 12, box[1] + 6), word, fill=WHITE, font=f)
    return img


def document(title: str, fields: list[tuple[str, str]], size=(420, 540)) -> Image.Image:
    """A form-like page: a title and `key: value` lines."""
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((24, 20), title, fill=BLACK, font=font(26))
    draw.line([(24, 60), (size[0] - 24, 60)], fill=BLACK, width=2)
    y = 80
    for key, value in fields:
        draw.text((24, y), f"{key}:", fill=BLACK, font=font(18))
        draw.text((200, y), value, fill=BLACK, font=font(18))
        y += 34
    return img


def bar_chart(title: str, labels: list[str], values: list[int], colour: str = "blue",
              size=(420, 320)) -> Image.Image:
    """A bar chart with its value printed above each bar and its label below."""
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((16, 8), title, fill=BLACK, font=font(18))
    top, bottom, left = 50, size[1] - 40, 30
    width = (size[0] - 2 * left) / len(values)
    vmax = max(values) or 1
    draw.line([(left, bottom), (size[0] - left, bottom)], fill=BLACK, width=2)
    for i, (label, v) in enumerate(zip(labels, values)):
        x0 = left + i * width + width * 0.15
        x1 = left + (i + 1) * width - width * 0.15
        y0 = bottom - (bottom - top - 20) * v / vmax
        draw.rectangle([x0, y0, x1, bottom], fill=synthetic.COLOURS[colour])
        draw.text(((x0 + x1) / 2 - draw.textlength(str(v), font=font(14)) / 2, y0 - 18), str(v), fill=BLACK,
                  font=font(14))
        draw.text(((x0 + x1) / 2 - draw.textlength(label, font=font(14)) / 2, bottom + 6), label, fill=BLACK,
                  font=font(14))
    return img


def labelled_diagram(shapes, labels: list[str], size: int = 336) -> Image.Image:
    """A shapes scene with a letter label drawn next to each shape (an AI2D-like diagram)."""
    img = scene(shapes, size)
    draw = ImageDraw.Draw(img)
    cell = size / synthetic.GRID
    for s, label in zip(shapes, labels):
        x = (s.col + 0.5) * cell + cell * 0.22
        y = (s.row + 0.5) * cell - cell * 0.42
        draw.rectangle([x - 2, y - 2, x + 20, y + 22], fill=WHITE, outline=BLACK)
        draw.text((x + 2, y), label, fill=BLACK, font=font(18))
    return img


def write_video(frames, path: str | Path, fps: int = 4) -> Path:
    """Frames (PIL, same size, even sides) as an mp4 file (MPEG-4 part 2: in every PyAV build)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for img in frames:
            frame = av.VideoFrame.from_image(img.convert("RGB")).reformat(format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)
    return path
