"""vtbench v2's generator (issue 22 item 4): determinism, balance, and every answer checked
against the rendered pixels (colour components, their bounding boxes and centroids, the
glyph read off a sign) or re-derived from the scene graph by rules written here."""

from __future__ import annotations

from collections import Counter, deque

import numpy as np
import pytest

from vtdsl.eval import bench2 as b2
from vtdsl.eval.bench import CHARS, COLORS, GLYPHS

N_PER_FAMILY = 12
REGION_NAMES = ["top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right"]


@pytest.fixture(scope="module")
def examples():
    return b2.generate("val", N_PER_FAMILY * len(b2.FAMILIES))


def _components(img: np.ndarray, rgb) -> list[dict]:
    """4-connected components of the pixels within 14 of `rgb` on every channel (objects
    are drawn at their palette colour +-12; the backgrounds are pale, far from every
    palette colour): bounding box, centroid and pixel count of each."""
    mask = (np.abs(img.astype(int) - np.array(rgb)) <= 14).all(-1)
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pts = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pts.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = np.array(pts).T
        out.append({"box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                    "centre": (float(xs.mean()), float(ys.mean())), "n": len(pts)})
    return out


def _component_of(img, obj) -> dict:
    (hit,) = [c for c in _components(img, obj["rgb"]) if c["box"] == obj["box"]]
    return hit


def _read_sign(img: np.ndarray, plate) -> str:
    px, py = plate
    ink = img[py:py + 7, px + 1:px + 6].max(-1) < 100
    rows = tuple("".join("#" if v else "." for v in row) for row in ink)
    (char,) = [c for c, glyph in GLYPHS.items() if glyph == rows]
    return char


def test_deterministic_and_splits_differ():
    a, b = b2.make_example("train", 17), b2.make_example("train", 17)
    assert a.question == b.question and a.answer == b.answer
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = b2.make_example("val", 17)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert a.image.size == (192, 192)
    with pytest.raises(ValueError, match="unknown split"):
        b2.make_example("dev", 0)


def test_families_round_robin_and_answers_spread(examples):
    assert Counter(e.family for e in examples) == {f: N_PER_FAMILY for f in b2.FAMILIES}
    many = b2.generate("train", 70 * 7)
    for family in ("exists", "relation", "count", "locate"):
        answers = Counter(e.answer for e in many if e.family == family)
        assert len(answers) == len(b2.answers_for(family)), (family, answers)
        assert max(answers.values()) <= 3 * min(answers.values()), (family, answers)
    assert set(Counter(e.meta["pattern"] for e in many)) == set(b2.PATTERNS)
    sizes = Counter(o["size"] for e in many for o in e.meta["objects"] if o["type"] == "shape")
    assert set(sizes) == {"small", "medium", "large"}
    # cluttered: 6 or more objects in most scenes
    assert np.mean([len(e.meta["objects"]) >= 6 for e in many]) > 0.9


def test_every_object_is_drawn_where_the_scene_says(examples):
    for e in examples:
        img = np.asarray(e.image)
        for o in e.meta["objects"]:
            if o["type"] == "shape":
                comp = _component_of(img, o)  # exactly one component with the object's box
                side = o["box"][2] - o["box"][0]
                lo, hi = b2.SIZES[o["size"]]
                assert lo <= side <= hi
                assert comp["n"] >= 0.3 * side * side
            else:
                assert _read_sign(img, o["plate"]) == o["char"]
                assert o["plate"][0] % 8 == 0 and o["plate"][1] % 8 == 0  # one patch


def _shapes(meta):
    return [o for o in meta["objects"] if o["type"] == "shape"]


def test_answers_from_the_pixels_and_the_scene_graph(examples):
    for e in examples:
        img, meta, shapes = np.asarray(e.image), e.meta, _shapes(e.meta)
        if e.family == "count":
            if meta["by"] == "color":
                n = len(_components(img, COLORS[meta["target"]]))
            else:
                n = sum(o["shape"] == meta["target"] for o in shapes)
            assert e.answer == ["one", "two", "three", "four", "five", "six"][n - 1], e.question
        elif e.family == "exists":
            found = any(o["shape"] == meta["shape"] and o["color"] == meta["color"] for o in shapes)
            assert e.answer == ("yes" if found else "no")
            if e.answer == "no" and meta["pope"] == "adversarial":
                assert any(o["shape"] == meta["shape"] for o in shapes)
                assert _components(img, COLORS[meta["color"]])
        elif e.family == "text":
            (sign,) = [o for o in meta["objects"] if o["type"] == "sign" and o["color"] == meta["color"]]
            assert _read_sign(img, sign["plate"]).lower() == e.answer
        elif e.family == "locate":
            (o,) = [o for o in shapes if (o["shape"], o["color"]) == (meta["shape"], meta["color"])]
            cx, cy = _component_of(img, o)["centre"]
            assert e.answer == REGION_NAMES[3 * int(cy // 64) + int(cx // 64)]
        elif e.family == "relation":
            a, b = ([o for o in shapes if [o["color"], o["shape"]] == meta[k]] for k in ("a", "b"))
            (ax, ay), (bx, by) = (_component_of(img, x[0])["centre"] for x in (a, b))
            assert len(a) == len(b) == 1
            truth = {"left of": ax < bx - 16, "right of": ax > bx + 16, "above": ay < by - 16, "below": ay > by + 16}
            assert e.answer == ("yes" if truth[meta["relation"]] else "no"), e.question
        elif e.family == "attribute":
            if meta["kind"] == "color":
                (o,) = [o for o in shapes if o["shape"] == meta["shape"]]
                assert e.answer == o["color"] and _component_of(img, o)
            else:
                (o,) = [o for o in shapes if (o["shape"], o["color"]) == (meta["shape"], meta["color"])]
                side = o["box"][2] - o["box"][0]
                assert e.answer == ("small" if side <= 14 else "medium" if side <= 28 else "large")
        elif meta["kind"] == "color":  # scene: the most common colour, by components in the image
            counts = {c: len(_components(img, rgb)) for c, rgb in COLORS.items()}
            best = max(counts.values())
            assert [c for c, n in counts.items() if n == best] == [e.answer]
        else:
            assert e.answer == meta["pattern"]


def test_vocabulary_covers_every_prompt_and_answer(examples):
    import re

    vocab = set(b2.vocabulary())
    for e in examples:
        words = re.findall(r"[\w-]+|[^\w\s-]", f"USER: {e.question} ASSISTANT: {e.answer}".lower())
        assert set(words) <= vocab, set(words) - vocab
    assert {c.lower() for c in CHARS} <= vocab
