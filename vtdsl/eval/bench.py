"""vtbench: a seeded synthetic visual question answering benchmark.

Every example is a 96x96 scene on a 3x3 grid of 32-pixel cells. A cell holds a coloured
shape, a small printed character (drawn from a built-in 5x7 bitmap font, so rendering
depends on no font file), or nothing. Each example asks one question whose answer is a
single word. Five task families are reported separately:

- ``color``   "What color is the circle?"              -> red / green / ... (6)
- ``locate``  "What shape is at the top-left?"         -> circle / square / ... (4)
- ``count``   "How many red shapes are there?"         -> one / two / three / four
- ``exists``  "Is there a blue triangle?"              -> yes / no
- ``read``    "What character is at the bottom-right?" -> a / b / e / ... (10); the
  glyphs are 10x14 pixels, each centred in a 2x2 block of 8-pixel patches aligned to
  the patch grid, so this family needs fine spatial detail: four specific tokens.

Locations name the nine cells: ``top-left top top-right left center right bottom-left
bottom bottom-right`` (row-major), so every part of the image, the top rows included, is
asked about.

Examples are a pure function of ``(split, index)``: the seed is ``SPLIT_SEEDS[split] +
index``, the family is ``FAMILIES[index % 5]`` and the answer is drawn uniformly from the
family's answer set before the scene is built around it, so answers are balanced. The
seed ranges of the splits are disjoint. ``test`` is for reporting only: never train or
search on it.

    from vtdsl.eval.bench import generate
    for ex in generate("val", 100):
        ex.image, ex.question, ex.answer, ex.family, ex.meta
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator

from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 3
CELL = IMAGE_SIZE // GRID  # 32

FAMILIES = ("color", "locate", "count", "exists", "read")
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 200, 25),
    "purple": (145, 55, 190),
    "orange": (250, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
# Row-major over the 3x3 grid: LOCATIONS[3 * row + col].
LOCATIONS = (
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
)
COUNT_WORDS = ("one", "two", "three", "four")
YES_NO = ("yes", "no")

# 5x7 bitmap glyphs ('#' = ink), drawn at GLYPH_SCALE -> 10x14 pixels.
GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
}
CHARS = tuple(GLYPHS)
GLYPH_SCALE = 2
GLYPH_W, GLYPH_H = 5 * GLYPH_SCALE, 7 * GLYPH_SCALE
GLYPH_BLOCK = 16  # a glyph sits centred in a 16x16 block aligned to 8-pixel patches

# Disjoint seed ranges, one per split (an index must stay below SPLIT_STRIDE).
SPLIT_STRIDE = 10_000_000
SPLIT_SEEDS = {"train": 0, "val": SPLIT_STRIDE, "test": 2 * SPLIT_STRIDE}

PROMPT_TEMPLATE = "USER: {image}\n{question} ASSISTANT:"


@dataclass
class Example:
    image: Image.Image
    question: str
    answer: str
    family: str
    meta: dict[str, Any] = field(default_factory=dict)


def answers_for(family: str) -> tuple[str, ...]:
    """The answer set of a task family (answers are drawn uniformly from it)."""
    return {
        "color": COLOR_NAMES,
        "locate": SHAPES,
        "count": COUNT_WORDS,
        "exists": YES_NO,
        "read": tuple(c.lower() for c in CHARS),
    }[family]


def location_of(cell: tuple[int, int] | list[int]) -> str:
    return LOCATIONS[GRID * cell[0] + cell[1]]


def cell_of(location: str) -> tuple[int, int]:
    i = LOCATIONS.index(location)
    return divmod(i, GRID)


# --------------------------------------------------------------------------- rendering


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def _place_shape(rng: random.Random, cell: tuple[int, int], shape: str, color: str) -> dict[str, Any]:
    size = rng.randint(14, 28)
    r, c = cell
    lo_x, lo_y = c * CELL + 2, r * CELL + 2
    x0 = rng.randint(lo_x, c * CELL + CELL - 2 - size)
    y0 = rng.randint(lo_y, r * CELL + CELL - 2 - size)
    return {
        "type": "shape", "shape": shape, "color": color, "cell": [r, c],
        "box": [x0, y0, x0 + size, y0 + size], "rgb": list(_jitter(rng, COLORS[color])),
    }


def _place_char(rng: random.Random, cell: tuple[int, int], char: str) -> dict[str, Any]:
    # The glyph is centred in a 2x2 block of the model's 8-pixel patches, placed on the
    # patch grid at one of 3x3 offsets in its cell: a character is always exactly four
    # visual tokens (the fine detail a pruning policy can lose), seen the same way each
    # time, which a tiny model can learn to read in CPU minutes (free offsets could not).
    r, c = cell
    bx = c * CELL + GLYPH_BLOCK // 2 * rng.randint(0, 2)
    by = r * CELL + GLYPH_BLOCK // 2 * rng.randint(0, 2)
    x0 = bx + (GLYPH_BLOCK - GLYPH_W) // 2
    y0 = by + (GLYPH_BLOCK - GLYPH_H) // 2
    ink = rng.randint(0, 60)
    return {
        "type": "char", "char": char, "cell": [r, c],
        "box": [x0, y0, x0 + GLYPH_W, y0 + GLYPH_H], "rgb": [ink, ink, ink],
    }


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict[str, Any]) -> None:
    x0, y0, x1, y1 = obj["box"]
    fill = tuple(obj["rgb"])
    if obj["type"] == "char":
        for j, row in enumerate(GLYPHS[obj["char"]]):
            for i, bit in enumerate(row):
                if bit == "#":
                    px, py = x0 + i * GLYPH_SCALE, y0 + j * GLYPH_SCALE
                    draw.rectangle([px, py, px + GLYPH_SCALE - 1, py + GLYPH_SCALE - 1], fill=fill)
        return
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "cross":
        s = x1 - x0
        t = max(4, s // 3)
        a = x0 + (s - t) // 2
        b = y0 + (s - t) // 2
        draw.rectangle([a, y0, a + t - 1, y1 - 1], fill=fill)
        draw.rectangle([x0, b, x1 - 1, b + t - 1], fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(shape)


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw a scene from its metadata (background and objects); pure and deterministic."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tuple(meta["background"]))
    draw = ImageDraw.Draw(img)
    for obj in meta["objects"]:
        _draw_object(draw, obj)
    return img


# --------------------------------------------------------------------------- scenes


class _Scene:
    """Free cells and placed objects while a scene is being built."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.free = [(r, c) for r in range(GRID) for c in range(GRID)]
        rng.shuffle(self.free)
        self.objects: list[dict[str, Any]] = []

    def take(self, cell: tuple[int, int] | None = None) -> tuple[int, int]:
        if cell is None:
            return self.free.pop()
        self.free.remove(cell)
        return cell

    def shape(self, shape: str, color: str, cell: tuple[int, int] | None = None) -> None:
        self.objects.append(_place_shape(self.rng, self.take(cell), shape, color))

    def char(self, char: str, cell: tuple[int, int] | None = None) -> None:
        self.objects.append(_place_char(self.rng, self.take(cell), char))

    def chars(self, lo: int, hi: int) -> None:
        for _ in range(min(len(self.free), self.rng.randint(lo, hi))):
            self.char(self.rng.choice(CHARS))


def _build(family: str, answer: str, rng: random.Random) -> tuple[str, dict[str, Any], _Scene]:
    """Build a scene whose correct answer is `answer`; return question, params, scene."""
    s = _Scene(rng)
    if family == "color":
        shape = rng.choice(SHAPES)
        s.shape(shape, answer)
        for other in rng.sample([x for x in SHAPES if x != shape], rng.randint(0, 3)):
            s.shape(other, rng.choice(COLOR_NAMES))
        s.chars(0, 2)
        return f"What color is the {shape}?", {"shape": shape}, s
    if family == "locate":
        location = rng.choice(LOCATIONS)
        s.shape(answer, rng.choice(COLOR_NAMES), cell_of(location))
        for _ in range(rng.randint(1, 4)):
            s.shape(rng.choice(SHAPES), rng.choice(COLOR_NAMES))
        s.chars(0, 2)
        return f"What shape is at the {location}?", {"location": location}, s
    if family == "count":
        k = COUNT_WORDS.index(answer) + 1
        by = rng.choice(("color", "shape"))
        if by == "color":
            target = rng.choice(COLOR_NAMES)
            for _ in range(k):
                s.shape(rng.choice(SHAPES), target)
            others = [c for c in COLOR_NAMES if c != target]
            for _ in range(rng.randint(0, 3)):
                s.shape(rng.choice(SHAPES), rng.choice(others))
            question = f"How many {target} shapes are there?"
        else:
            target = rng.choice(SHAPES)
            for _ in range(k):
                s.shape(target, rng.choice(COLOR_NAMES))
            others = [x for x in SHAPES if x != target]
            for _ in range(rng.randint(0, 3)):
                s.shape(rng.choice(others), rng.choice(COLOR_NAMES))
            question = f"How many {SHAPE_PLURALS[target]} are there?"
        s.chars(0, 2)
        return question, {"by": by, "target": target}, s
    if family == "exists":
        shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
        if answer == "yes":
            s.shape(shape, color)
        # Near misses (same shape or same colour, never both) make the question non-trivial.
        for _ in range(rng.randint(1 if answer == "no" else 0, 3)):
            if rng.random() < 0.5:
                s.shape(shape, rng.choice([c for c in COLOR_NAMES if c != color]))
            else:
                s.shape(rng.choice([x for x in SHAPES if x != shape]), color)
        for _ in range(rng.randint(0, 1)):
            s.shape(rng.choice([x for x in SHAPES if x != shape]),
                    rng.choice([c for c in COLOR_NAMES if c != color]))
        s.chars(0, 2)
        return f"Is there a {color} {shape}?", {"shape": shape, "color": color}, s
    if family == "read":
        location = rng.choice(LOCATIONS)
        s.char(answer.upper(), cell_of(location))
        for _ in range(rng.randint(1, 3)):
            s.shape(rng.choice(SHAPES), rng.choice(COLOR_NAMES))
        s.chars(1, 3)
        return f"What character is at the {location}?", {"location": location}, s
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def seed_of(split: str, index: int) -> int:
    """The seed of example `index` of `split` (disjoint ranges per split)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SEEDS)}")
    if not 0 <= index < SPLIT_STRIDE:
        raise ValueError(f"index {index} out of range [0, {SPLIT_STRIDE})")
    return SPLIT_SEEDS[split] + index


def make_example(split: str, index: int) -> Example:
    """Example number `index` of `split`; a pure function of its arguments."""
    seed = seed_of(split, index)
    rng = random.Random(seed)
    family = FAMILIES[index % len(FAMILIES)]
    answer = rng.choice(answers_for(family))
    question, params, scene = _build(family, answer, rng)
    # Objects are drawn in cell order so the draw order carries no information.
    objects = sorted(scene.objects, key=lambda o: tuple(o["cell"]))
    background = [rng.randint(236, 255) for _ in range(3)]
    meta = {"split": split, "index": index, "seed": seed, "background": background,
            "objects": objects, **params}
    return Example(render(meta), question, answer, family, meta)


def iter_examples(split: str, n: int, start: int = 0) -> Iterator[Example]:
    for i in range(start, start + n):
        yield make_example(split, i)


def generate(split: str, n: int, start: int = 0) -> list[Example]:
    """Examples ``start .. start+n-1`` of `split` (deterministic)."""
    return list(iter_examples(split, n, start))


def answer_from_meta(family: str, meta: dict[str, Any]) -> str:
    """Re-derive an example's answer from its scene metadata alone."""
    objs = meta["objects"]
    shapes = [o for o in objs if o["type"] == "shape"]
    if family == "color":
        (hit,) = [o for o in shapes if o["shape"] == meta["shape"]]
        return hit["color"]
    if family in ("locate", "read"):
        cell = list(cell_of(meta["location"]))
        (hit,) = [o for o in objs if o["cell"] == cell]
        return hit["shape"] if family == "locate" else hit["char"].lower()
    if family == "count":
        n = sum(o[meta["by"]] == meta["target"] for o in shapes)
        return COUNT_WORDS[n - 1]
    if family == "exists":
        found = any(o["shape"] == meta["shape"] and o["color"] == meta["color"] for o in shapes)
        return "yes" if found else "no"
    raise ValueError(family)


def scene_questions(meta: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every (family, question, answer) the templates can ask about a scene, answers
    derived from its metadata (used to add conversation turns when training; the
    benchmark's own examples ask one question each)."""
    objs = meta["objects"]
    shapes = [o for o in objs if o["type"] == "shape"]
    out: list[tuple[str, str, str]] = []
    kinds = [o["shape"] for o in shapes]
    for o in shapes:
        if kinds.count(o["shape"]) == 1:
            out.append(("color", f"What color is the {o['shape']}?", o["color"]))
        out.append(("locate", f"What shape is at the {location_of(o['cell'])}?", o["shape"]))
    for o in objs:
        if o["type"] == "char":
            out.append(("read", f"What character is at the {location_of(o['cell'])}?", o["char"].lower()))
    for color in COLOR_NAMES:
        n = sum(o["color"] == color for o in shapes)
        if 1 <= n <= len(COUNT_WORDS):
            out.append(("count", f"How many {color} shapes are there?", COUNT_WORDS[n - 1]))
    for shape in SHAPES:
        n = sum(o["shape"] == shape for o in shapes)
        if 1 <= n <= len(COUNT_WORDS):
            out.append(("count", f"How many {SHAPE_PLURALS[shape]} are there?", COUNT_WORDS[n - 1]))
    present = {(o["color"], o["shape"]) for o in shapes}
    for color in COLOR_NAMES:
        for shape in SHAPES:
            out.append(("exists", f"Is there a {color} {shape}?", "yes" if (color, shape) in present else "no"))
    return out


def prompt(question: str, image_tokens: int | None = None, image_token: str = "<image>") -> str:
    """LLaVA-1.5 style prompt; `image_tokens` repeats the placeholder (None: one, for a
    processor that expands it)."""
    image = image_token if image_tokens is None else image_token * image_tokens
    return PROMPT_TEMPLATE.format(image=image, question=question)


def vocabulary() -> list[str]:
    """Every word (lower case, punctuation split off) that prompts and answers use."""
    words: set[str] = {"user", "assistant", ":", "?", "-", "\n"}
    texts = [
        "what color is the shape shapes at character how many are there is there a",
        " ".join(SHAPES), " ".join(SHAPE_PLURALS.values()), " ".join(COLOR_NAMES),
        " ".join(LOCATIONS).replace("-", " "), " ".join(COUNT_WORDS), " ".join(YES_NO),
        " ".join(c.lower() for c in CHARS),
    ]
    for t in texts:
        words.update(t.split())
    return sorted(words)
