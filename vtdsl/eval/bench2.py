"""vtbench v2: cluttered synthetic scenes with benchmark-like questions (issue 22 item 4).

v1 (`vtdsl.eval.bench`) draws sparse 3x3 scenes with one named cell per question, so no
token is redundant and position alone can carry the answer. v2 draws what the papers'
benchmarks look like, at 192x192 pixels (24x24 patches of 8, the geometry of
tiny-llava-vtbench2):

- a textured background (stripes, checks, dots or grain, low contrast) and 6..12 objects
  of three sizes (small 10-14, medium 20-28, large 36-44 pixels), never overlapping;
  objects are shapes (5 kinds x 6 colours) and, in `text` scenes, small signs: a white
  plate with one 5x7-pixel character on it, aligned to one 8-pixel patch (a sign is
  exactly one visual token);
- seven question families, reported separately:

| family | question | answers |
|---|---|---|
| `exists` | Is there a blue triangle? (POPE: absent objects random, popular or adversarial) | yes / no |
| `attribute` | What color is the diamond? / What size is the red circle? | 6 colours / 3 sizes |
| `relation` | Is the red circle left of the blue square? (left, right, above, below) | yes / no |
| `count` | How many red shapes are there? / How many circles are there? | one .. six |
| `text` | What is written on the red sign? | 10 characters |
| `locate` | Where is the green cross? | 9 regions (top-left .. bottom-right) |
| `scene` | What pattern is the background? / Which color is most common? | 4 patterns / 6 colours |

Examples are a pure function of ``(split, index)``: seed ``SPLIT_SEEDS[split] + index``
(v1's disjoint ranges), family ``FAMILIES[index % 7]``, the answer drawn uniformly from
the family's answer set first and the scene built around it (balanced answers).

    from vtdsl.eval.bench2 import generate
    for ex in generate("val", 100):
        ex.image, ex.question, ex.answer, ex.family, ex.meta
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .bench import CHARS, COLOR_NAMES, COLORS, GLYPHS, Example, _draw_object, seed_of

IMAGE_SIZE = 192
PATCH = 8
FAMILIES = ("exists", "attribute", "relation", "count", "text", "locate", "scene")
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
           "diamond": "diamonds"}
SIZES = {"small": (10, 14), "medium": (20, 28), "large": (36, 44)}
PATTERNS = ("stripes", "checks", "dots", "grain")
REGIONS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
YES_NO = ("yes", "no")
# A relation is asked only where the centres differ by this much along its axis (no
# borderline cases), and a located object's centre lies this far inside its region.
RELATION_GAP = 24
REGION_MARGIN = 8
SIGN = PATCH  # a sign is one patch: an 8x8 white plate, the 5x7 glyph inset by (1, 0)
# The part of every prompt before the question (`bench.PROMPT_TEMPLATE`, as v1).
IMAGE_PROMPT_PREFIX = "USER: <image>\n"


def answers_for(family: str, meta: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The answer set of a family (of a question kind, for `attribute` and `scene`)."""
    kind = (meta or {}).get("kind")
    return {
        "exists": YES_NO, "relation": YES_NO, "count": COUNT_WORDS, "text": tuple(c.lower() for c in CHARS),
        "locate": REGIONS, "attribute": tuple(SIZES) if kind == "size" else COLOR_NAMES,
        "scene": PATTERNS if kind == "pattern" else COLOR_NAMES,
    }[family]


def region_of(cx: float, cy: float) -> str:
    third = IMAGE_SIZE / 3
    return REGIONS[3 * min(2, int(cy // third)) + min(2, int(cx // third))]


# --------------------------------------------------------------------------- rendering


def _texture(meta: dict[str, Any]) -> np.ndarray:
    """The background: a pale base colour and its pattern in a slightly darker shade."""
    rng = np.random.default_rng(meta["seed"])
    base = np.array(meta["background"], dtype=np.int16)
    img = np.broadcast_to(base, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    period = meta["period"]
    mask = {
        "stripes": ((x + y) // (period // 2)) % 2 == 0,
        "checks": ((x // period) + (y // period)) % 2 == 0,
        "dots": ((x % period) < 3) & ((y % period) < 3),
        "grain": rng.random((IMAGE_SIZE, IMAGE_SIZE)) < 0.3,
    }[meta["pattern"]]
    img[mask] -= 28
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_shape(draw: ImageDraw.ImageDraw, obj: dict[str, Any]) -> None:
    """v1's shapes as v1 draws them, and the diamond."""
    if obj["shape"] != "diamond":
        _draw_object(draw, obj)
        return
    x0, y0, x1, y1 = obj["box"]
    draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, (y0 + y1) / 2), ((x0 + x1) / 2, y1 - 1), (x0, (y0 + y1) / 2)],
                 fill=tuple(obj["rgb"]))


def _draw_sign(draw: ImageDraw.ImageDraw, obj: dict[str, Any]) -> None:
    x0, y0, x1, y1 = obj["box"]  # the coloured frame (one pixel) around the 8x8 plate
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=tuple(obj["rgb"]))
    px, py = obj["plate"]
    draw.rectangle([px, py, px + SIGN - 1, py + SIGN - 1], fill=(255, 255, 255))
    for j, row in enumerate(GLYPHS[obj["char"]]):
        for i, bit in enumerate(row):
            if bit == "#":
                draw.point((px + 1 + i, py + j), fill=(0, 0, 0))


def render(meta: dict[str, Any]) -> Image.Image:
    """Draw a scene from its metadata; pure and deterministic."""
    img = Image.fromarray(_texture(meta))
    draw = ImageDraw.Draw(img)
    for obj in meta["objects"]:
        (_draw_sign if obj["type"] == "sign" else _draw_shape)(draw, obj)
    return img


# --------------------------------------------------------------------------- scenes


class _Scene:
    """Objects placed without overlap (a 2-pixel gap) while a scene is built."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.objects: list[dict[str, Any]] = []

    def _free(self, box: list[int]) -> bool:
        return all(box[0] >= o["box"][2] + 2 or o["box"][0] >= box[2] + 2 or box[1] >= o["box"][3] + 2
                   or o["box"][1] >= box[3] + 2 for o in self.objects)

    def shape(self, shape: str, color: str, size: str | None = None, region: str | None = None) -> dict | None:
        """Place a shape (in `region`, its centre `REGION_MARGIN` inside); None if no room."""
        rng = self.rng
        size = size or rng.choice(tuple(SIZES))
        s = rng.randint(*SIZES[size])
        lo, hi = (0, IMAGE_SIZE)
        for _ in range(200):
            if region is None:
                x0, y0 = rng.randint(lo, hi - s), rng.randint(lo, hi - s)
            else:
                r, c = divmod(REGIONS.index(region), 3)
                third = IMAGE_SIZE // 3
                cx = rng.randint(c * third + REGION_MARGIN, (c + 1) * third - REGION_MARGIN)
                cy = rng.randint(r * third + REGION_MARGIN, (r + 1) * third - REGION_MARGIN)
                x0, y0 = min(max(0, cx - s // 2), IMAGE_SIZE - s), min(max(0, cy - s // 2), IMAGE_SIZE - s)
            box = [x0, y0, x0 + s, y0 + s]
            if self._free(box):
                rgb = [max(0, min(255, v + rng.randint(-12, 12))) for v in COLORS[color]]
                obj = {"type": "shape", "shape": shape, "color": color, "size": size, "box": box, "rgb": rgb}
                self.objects.append(obj)
                return obj
        return None

    def sign(self, char: str, color: str) -> dict | None:
        rng = self.rng
        n = IMAGE_SIZE // PATCH
        for _ in range(200):
            px, py = PATCH * rng.randint(1, n - 2), PATCH * rng.randint(1, n - 2)
            box = [px - 1, py - 1, px + SIGN + 1, py + SIGN + 1]
            if self._free(box):
                obj = {"type": "sign", "char": char, "color": color, "box": box, "plate": [px, py],
                       "rgb": list(COLORS[color])}
                self.objects.append(obj)
                return obj
        return None

    def clutter(self, n: int, avoid=lambda shape, color: False) -> None:
        """Up to `n` more shapes, none for which `avoid(shape, color)` holds."""
        for _ in range(n):
            for _ in range(20):
                shape, color = self.rng.choice(SHAPES), self.rng.choice(COLOR_NAMES)
                if not avoid(shape, color):
                    self.shape(shape, color)
                    break

    def shapes(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["type"] == "shape"]


def _unique_pair(s: _Scene, color: str, shape: str, n: int, **place) -> dict | None:
    """A (color, shape) object and `n` clutter shapes, none of them that pair."""
    obj = s.shape(shape, color, **place)
    s.clutter(n, avoid=lambda sh, c: (sh, c) == (shape, color))
    return obj


def _exists(s: _Scene, answer: str, n: int) -> tuple[str, dict]:
    rng = s.rng
    shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
    pope = rng.choice(("random", "adversarial"))
    if answer == "yes":
        _unique_pair(s, color, shape, n)
    else:
        if pope == "adversarial":  # POPE's hard negatives: its colour and its shape are both there
            s.shape(shape, rng.choice([c for c in COLOR_NAMES if c != color]))
            s.shape(rng.choice([x for x in SHAPES if x != shape]), color)
        s.clutter(n, avoid=lambda sh, c: (sh, c) == (shape, color))
    return f"Is there a {color} {shape}?", {"shape": shape, "color": color, "pope": pope}


def _attribute(s: _Scene, answer: str, kind: str, n: int) -> tuple[str, dict]:
    rng = s.rng
    shape = rng.choice(SHAPES)
    if kind == "color":  # the shape is unique in the scene
        s.shape(shape, answer)
        s.clutter(n, avoid=lambda sh, c: sh == shape)
        return f"What color is the {shape}?", {"shape": shape}
    color = rng.choice(COLOR_NAMES)
    obj = s.shape(shape, color, size=answer)
    s.clutter(n, avoid=lambda sh, c: (sh, c) == (shape, color))
    assert obj is not None  # the first object always fits
    return f"What size is the {color} {shape}?", {"shape": shape, "color": color}


def _relation(s: _Scene, answer: str, n: int) -> tuple[str, dict]:
    """Two unique objects whose centres differ by >= RELATION_GAP on both axes."""
    rng = s.rng
    (s1, s2), (c1, c2) = rng.sample(SHAPES, 2), rng.sample(COLOR_NAMES, 2)
    a = s.shape(s1, c1, size=rng.choice(("small", "medium")))
    for _ in range(50):
        b = s.shape(s2, c2, size=rng.choice(("small", "medium")))
        if b is None:
            continue
        dx = (b["box"][0] + b["box"][2] - a["box"][0] - a["box"][2]) / 2
        dy = (b["box"][1] + b["box"][3] - a["box"][1] - a["box"][3]) / 2
        if abs(dx) >= RELATION_GAP and abs(dy) >= RELATION_GAP:
            break
        s.objects.remove(b)
    truth = {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}  # a relative to b
    relation = rng.choice([r for r in RELATIONS if truth[r] == (answer == "yes")])
    s.clutter(n, avoid=lambda sh, c: (sh, c) in ((s1, c1), (s2, c2)))
    return f"Is the {c1} {s1} {relation} the {c2} {s2}?", {"a": [c1, s1], "b": [c2, s2], "relation": relation}


def _count(s: _Scene, answer: str, n: int) -> tuple[str, dict]:
    rng = s.rng
    k = COUNT_WORDS.index(answer) + 1
    by = rng.choice(("color", "shape"))
    if by == "color":
        target = rng.choice(COLOR_NAMES)
        placed = [s.shape(rng.choice(SHAPES), target, size=rng.choice(("small", "medium"))) for _ in range(k)]
        s.clutter(max(0, n - k), avoid=lambda sh, c: c == target)
        question = f"How many {target} shapes are there?"
    else:
        target = rng.choice(SHAPES)
        placed = [s.shape(target, rng.choice(COLOR_NAMES), size=rng.choice(("small", "medium"))) for _ in range(k)]
        s.clutter(max(0, n - k), avoid=lambda sh, c: sh == target)
        question = f"How many {PLURALS[target]} are there?"
    assert all(placed), "no room for a counted shape"
    return question, {"by": by, "target": target}


def _text(s: _Scene, answer: str, n: int) -> tuple[str, dict]:
    rng = s.rng
    colors = rng.sample(COLOR_NAMES, rng.randint(1, 3))
    s.sign(answer.upper(), colors[0])
    for c in colors[1:]:
        s.sign(rng.choice(CHARS), c)
    s.clutter(n)
    return f"What is written on the {colors[0]} sign?", {"color": colors[0]}


def _locate(s: _Scene, answer: str, n: int) -> tuple[str, dict]:
    rng = s.rng
    shape, color = rng.choice(SHAPES), rng.choice(COLOR_NAMES)
    _unique_pair(s, color, shape, n, size=rng.choice(("small", "medium")), region=answer)
    return f"Where is the {color} {shape}?", {"shape": shape, "color": color}


def _scene(s: _Scene, answer: str, kind: str, n: int) -> tuple[str, dict]:
    if kind == "pattern":
        s.clutter(n)
        return "What pattern is the background?", {}
    rng = s.rng
    m = rng.randint(3, 5)  # the answer colour m times, every other colour at most m - 2
    for _ in range(m):
        s.shape(rng.choice(SHAPES), answer, size=rng.choice(("small", "medium")))
    others = [c for c in COLOR_NAMES if c != answer]
    for _ in range(max(0, n - m)):
        counts = {c: sum(o["color"] == c for o in s.shapes()) for c in others}
        fits = [c for c in others if counts[c] <= m - 3]
        if fits:
            s.shape(rng.choice(SHAPES), rng.choice(fits))
    return "Which color is most common?", {}


def make_example(split: str, index: int) -> Example:
    """Example number `index` of `split`; a pure function of its arguments."""
    seed = seed_of(split, index)
    rng = random.Random(f"vtbench2-{seed}")
    family = FAMILIES[index % len(FAMILIES)]
    kind = {"attribute": rng.choice(("color", "size")), "scene": rng.choice(("pattern", "color"))}.get(family)
    answer = rng.choice(answers_for(family, {"kind": kind}))
    pattern = answer if kind == "pattern" else rng.choice(PATTERNS)
    s = _Scene(rng)
    n = rng.randint(5, 11)  # clutter beside the asked objects: 6..12 objects in all
    build = {"exists": _exists, "relation": _relation, "count": _count, "text": _text, "locate": _locate}
    if family in build:
        question, params = build[family](s, answer, n)
    else:
        question, params = (_attribute if family == "attribute" else _scene)(s, answer, kind, n)
    meta = {"split": split, "index": index, "seed": seed, "kind": kind, "pattern": pattern,
            "period": 2 * rng.randint(4, 8), "background": [rng.randint(215, 245) for _ in range(3)],
            "objects": s.objects, **params}
    return Example(render(meta), question, answer, family, meta)


def generate(split: str, n: int, start: int = 0) -> list[Example]:
    """Examples ``start .. start+n-1`` of `split` (deterministic)."""
    return [make_example(split, i) for i in range(start, start + n)]


def vocabulary() -> list[str]:
    """Every word (lower case, punctuation split off, hyphenated words whole: `top-left`
    is one answer token) that v2 prompts and answers use."""
    words: set[str] = {"user", "assistant", ":", "?", "-", "\n"}
    texts = ["is there a what color size is the how many shapes are there written on sign where pattern "
             "background which most common of", " ".join(SHAPES), " ".join(PLURALS.values()), " ".join(COLOR_NAMES),
             " ".join(SIZES), " ".join(PATTERNS), " ".join(REGIONS), " ".join(RELATIONS),
             " ".join(COUNT_WORDS), " ".join(YES_NO), " ".join(c.lower() for c in CHARS)]
    for t in texts:
        words.update(t.split())
    return sorted(words)


def _centre(obj: dict[str, Any]) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _inside_region(cx: float, cy: float) -> bool:
    """Whether a centre lies `REGION_MARGIN` inside its region (no borderline answers)."""
    third = IMAGE_SIZE / 3
    return all(REGION_MARGIN <= v % third <= third - REGION_MARGIN for v in (cx, cy))


def scene_questions(meta: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(family, question, answer) of questions the templates can ask about a scene, each
    answer derived from its metadata alone (extra training questions per image)."""
    shapes = [o for o in meta["objects"] if o["type"] == "shape"]
    pairs = Counter((o["color"], o["shape"]) for o in shapes)
    kinds = Counter(o["shape"] for o in shapes)
    out: list[tuple[str, str, str]] = [("scene", "What pattern is the background?", meta["pattern"])]
    for color in COLOR_NAMES:
        for shape in SHAPES:
            out.append(("exists", f"Is there a {color} {shape}?", "yes" if pairs[(color, shape)] else "no"))
    unique = [o for o in shapes if pairs[(o["color"], o["shape"])] == 1]
    for o in unique:
        out.append(("attribute", f"What size is the {o['color']} {o['shape']}?", o["size"]))
        if _inside_region(*_centre(o)):
            out.append(("locate", f"Where is the {o['color']} {o['shape']}?", region_of(*_centre(o))))
    out += [("attribute", f"What color is the {o['shape']}?", o["color"]) for o in shapes if kinds[o["shape"]] == 1]
    for a in unique:
        for b in unique:
            (ax, ay), (bx, by) = _centre(a), _centre(b)
            if abs(ax - bx) >= RELATION_GAP and abs(ay - by) >= RELATION_GAP:
                relation = random.Random(f"{meta['seed']}-{ax}-{bx}").choice(RELATIONS)
                truth = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
                out.append(("relation", f"Is the {a['color']} {a['shape']} {relation} the {b['color']} {b['shape']}?",
                            "yes" if truth else "no"))
    colors = Counter(o["color"] for o in shapes)
    for name, n in list(colors.items()) + list(kinds.items()):
        if 1 <= n <= len(COUNT_WORDS):
            what = f"{name} shapes" if name in COLORS else PLURALS[name]
            out.append(("count", f"How many {what} are there?", COUNT_WORDS[n - 1]))
    top = colors.most_common(2)
    if top and (len(top) == 1 or top[0][1] >= top[1][1] + 2):
        out.append(("scene", "Which color is most common?", top[0][0]))
    out += [("text", f"What is written on the {o['color']} sign?", o["char"].lower())
            for o in meta["objects"] if o["type"] == "sign"]
    return out
