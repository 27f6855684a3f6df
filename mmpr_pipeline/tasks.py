"""A bundled, seeded generator of visual questions with exact answers, drawn with pillow.

It makes the default recipe run offline, gives the tests real images, and gives the demo model
something to learn (each question comes with a short rationale ending in `Final answer: ...`).

Families:
- `count`  : "How many shapes are there?"                      -> number
- `color`  : "What color is the <shape>?" (lettered options)   -> multiple_choice
- `bars`   : "Which bar is the tallest?" (lettered bars)        -> multiple_choice
- `compare`: "Are there more circles than squares?"            -> yes_no
- `describe`: "Describe this image." (a reference description, no checkable answer: DropoutNTP)
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any

from PIL import Image, ImageDraw

FAMILIES = ("count", "color", "bars", "compare", "describe")
ANSWER_TYPES = {
    "count": "number",
    "color": "multiple_choice",
    "bars": "multiple_choice",
    "compare": "yes_no",
    "describe": "text",
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 112  # pixels; the demo model's processor sees at most 112x112
LETTERS = "ABCD"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _grid_boxes(rng: random.Random, k: int, cell: int = 28, margin: int = 4):
    """k non-overlapping boxes on a 4x4 grid of cells."""
    cells = rng.sample(range(16), k)
    for c in cells:
        r, q = divmod(c, 4)
        x0, y0 = q * cell + margin, r * cell + margin
        yield (x0, y0, x0 + cell - 2 * margin, y0 + cell - 2 * margin)


def _options(rng: random.Random, correct: str, pool: list[str]) -> tuple[list[str], str]:
    others = rng.sample([p for p in pool if p != correct], 3)
    options = others + [correct]
    rng.shuffle(options)
    return options, LETTERS[options.index(correct)]


def _lettered(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _count(rng: random.Random) -> dict[str, Any]:
    k = rng.randint(1, 6)
    shape = rng.choice(SHAPES)
    color_name = rng.choice(list(COLORS))
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    for box in _grid_boxes(rng, k):
        _draw_shape(draw, shape, box, COLORS[color_name])
    seen = ", ".join([f"one {shape}"] * k)
    rationale = f"I look at the image and count the {shape}s: {seen}. In total there are {k}."
    return dict(
        image=img,
        question=f"How many {shape}s are in the image?",
        answer=str(k),
        options=[],
        rationale=rationale,
        description=f"The image shows {k} {color_name} {shape}{'s' if k > 1 else ''} on a white background.",
    )


def _color(rng: random.Random) -> dict[str, Any]:
    shape = rng.choice(SHAPES)
    color_name = rng.choice(list(COLORS))
    img = Image.new("RGB", (SIZE, SIZE), "white")
    _draw_shape(ImageDraw.Draw(img), shape, (20, 20, 92, 92), COLORS[color_name])
    options, letter = _options(rng, color_name, list(COLORS))
    q = (
        f"What color is the {shape}?\n{_lettered(options)}\n"
        "Answer with the option's letter from the given choices directly."
    )
    rationale = (
        f"There is one {shape} in the middle of the image. "
        f"Its color is {color_name}, which is option {letter}."
    )
    return dict(
        image=img,
        question=q,
        answer=letter,
        options=options,
        rationale=rationale,
        description=f"The image shows a large {color_name} {shape} in the center of a white background.",
    )


def _bars(rng: random.Random) -> dict[str, Any]:
    heights = rng.sample(range(15, 95, 5), 4)
    color_name = rng.choice(list(COLORS))
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    for i, h in enumerate(heights):
        x0 = 8 + i * 26
        draw.rectangle((x0, SIZE - 4 - h, x0 + 18, SIZE - 4), fill=COLORS[color_name])
        draw.text((x0 + 6, 2), LETTERS[i], fill=(0, 0, 0))
    best = LETTERS[heights.index(max(heights))]
    q = f"Which bar is the tallest?\n{_lettered([f'bar {x}' for x in LETTERS])}"
    order = ", ".join(f"bar {LETTERS[i]} is {h}" for i, h in enumerate(heights))
    rationale = f"I compare the heights of the four bars: {order}. The tallest is bar {best}."
    return dict(
        image=img,
        question=q,
        answer=best,
        options=[f"bar {x}" for x in LETTERS],
        rationale=rationale,
        description=f"The image is a bar chart with four {color_name} bars labelled A to D.",
    )


def _compare(rng: random.Random) -> dict[str, Any]:
    a, b = rng.sample(range(0, 6), 2)
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    boxes = list(_grid_boxes(rng, a + b))
    for box in boxes[:a]:
        _draw_shape(draw, "circle", box, COLORS["blue"])
    for box in boxes[a:]:
        _draw_shape(draw, "square", box, COLORS["red"])
    ans = "Yes" if a > b else "No"
    rationale = f"I count {a} circles and {b} squares. {a} is {'more' if a > b else 'not more'} than {b}."
    return dict(
        image=img,
        question="Are there more circles than squares? Please answer yes or no.",
        answer=ans,
        options=[],
        rationale=rationale,
        description=f"The image shows {a} blue circles and {b} red squares on a white background.",
    )


_MAKERS = {"count": _count, "color": _color, "bars": _bars, "compare": _compare}


def generate(
    n: int,
    seed: int = 0,
    families: list[str] | tuple[str, ...] = ("count", "color", "bars", "compare"),
    offset: int = 0,
) -> Iterator[dict[str, Any]]:
    """Yield `n` questions, cycling through `families`; the same (seed, index) gives the same row.

    `offset` starts at a later index, so held-out splits never overlap training ones.
    Rows have: image (PNG bytes), question, answer, answer_type, options, task, rationale, response
    (the rationale plus the final-answer line: a reference chain of thought), description.
    """
    for i in range(offset, offset + n):
        family = families[i % len(families)]
        rng = random.Random(f"{seed}-{i}")
        if family == "describe":
            inner = rng.choice(list(_MAKERS))
            row = _MAKERS[inner](rng)
            row.update(question="Describe this image.", answer="", options=[], rationale=row["description"])
        else:
            row = _MAKERS[family](rng)
        row["image"] = _png(row["image"])
        row["task"] = family
        row["answer_type"] = ANSWER_TYPES[family]
        row["response"] = (
            row["rationale"] if family == "describe" else f"{row['rationale']}\nFinal answer: {row['answer']}"
        )
        yield row
