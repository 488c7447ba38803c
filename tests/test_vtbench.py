"""vtbench: generator, tokenizer/processor and the evaluation harness."""

from __future__ import annotations

import collections
import hashlib
import json

import pytest
import torch

from vtdsl.eval import bench
from vtdsl.eval.bench import (CELL, CHARS, COLORS, COUNT_WORDS, FAMILIES, GLYPH_SCALE, GLYPHS,
                              LOCATIONS, SHAPES, generate, make_example)


def _digest(ex: bench.Example) -> str:
    h = hashlib.sha256(ex.image.tobytes())
    h.update(f"{ex.question}|{ex.answer}|{ex.family}|{json.dumps(ex.meta, sort_keys=True)}".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def sample() -> list[bench.Example]:
    return generate("val", 1000)


# --------------------------------------------------------------------------- generator


def test_same_seed_same_bytes():
    a, b = generate("train", 25, start=1234), generate("train", 25, start=1234)
    assert [_digest(x) for x in a] == [_digest(x) for x in b]
    # a single example is the same whether made alone or inside a range
    assert _digest(make_example("train", 1240)) == _digest(a[6])


def test_splits_differ_and_seed_ranges_are_disjoint():
    digests = {s: {_digest(x) for x in generate(s, 30)} for s in ("train", "val", "test")}
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    seeds = sorted(bench.SPLIT_SEEDS.values())
    assert all(b - a >= bench.SPLIT_STRIDE for a, b in zip(seeds, seeds[1:]))
    with pytest.raises(ValueError):
        make_example("train", bench.SPLIT_STRIDE)
    with pytest.raises(ValueError):
        make_example("dev", 0)


def test_families_round_robin(sample):
    assert [ex.family for ex in sample[:10]] == list(FAMILIES) * 2
    assert {ex.image.size for ex in sample} == {(bench.IMAGE_SIZE, bench.IMAGE_SIZE)}


def _derive(ex: bench.Example) -> str:
    """The answer from the question text and the scene objects, written independently of
    bench.answer_from_meta."""
    q = ex.question.rstrip("?").split()
    objs = ex.meta["objects"]
    shapes = [o for o in objs if o["type"] == "shape"]
    loc_cell = {name: [i // 3, i % 3] for i, name in enumerate(LOCATIONS)}
    if ex.family == "color":  # What color is the <shape>?
        hits = [o for o in shapes if o["shape"] == q[-1]]
        assert len(hits) == 1, "the named shape must be unique"
        return hits[0]["color"]
    if ex.family in ("locate", "read"):  # What shape/character is at the <loc>?
        hits = [o for o in objs if o["cell"] == loc_cell[q[-1]]]
        assert len(hits) == 1
        o = hits[0]
        assert o["type"] == ("shape" if ex.family == "locate" else "char")
        return o["shape"] if ex.family == "locate" else o["char"].lower()
    if ex.family == "count":  # How many <color> shapes / <plural> are there?
        word = q[2]
        if word in COLORS:
            n = sum(o["color"] == word for o in shapes)
        else:
            n = sum(o["shape"] + ("es" if o["shape"] == "cross" else "s") == word for o in shapes)
        return ["zero", "one", "two", "three", "four", "five"][n]
    if ex.family == "exists":  # Is there a <color> <shape>?
        color, shape = q[-2], q[-1]
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in shapes) else "no"
    raise AssertionError(ex.family)


def test_answers_follow_from_scene(sample):
    for ex in sample + generate("train", 250) + generate("test", 250):
        assert _derive(ex) == ex.answer, (ex.meta["split"], ex.meta["index"], ex.question)
        assert bench.answer_from_meta(ex.family, ex.meta) == ex.answer


def test_rendering_matches_metadata(sample):
    """Each object is drawn where meta says, inside its own cell, in its colour / glyph."""
    for ex in sample[:300]:
        px = ex.image.load()
        cells = [tuple(o["cell"]) for o in ex.meta["objects"]]
        assert len(cells) == len(set(cells)), "one object per cell"
        for o in ex.meta["objects"]:
            x0, y0, x1, y1 = o["box"]
            r, c = o["cell"]
            assert c * CELL <= x0 < x1 <= (c + 1) * CELL and r * CELL <= y0 < y1 <= (r + 1) * CELL
            if o["type"] == "shape":
                assert px[(x0 + x1) // 2, (y0 + y1) // 2] == tuple(o["rgb"])
                # the drawn colour is nearest to the named colour
                near = min(COLORS, key=lambda k: sum((a - b) ** 2 for a, b in zip(COLORS[k], o["rgb"])))
                assert near == o["color"]
            else:
                for j, row in enumerate(GLYPHS[o["char"]]):
                    for i, bit in enumerate(row):
                        p = px[x0 + i * GLYPH_SCALE, y0 + j * GLYPH_SCALE]
                        want = tuple(o["rgb"]) if bit == "#" else tuple(ex.meta["background"])
                        assert p == want


def test_every_character_lies_on_exactly_four_8_pixel_patches(sample):
    """A glyph is read from a 2x2 block of the model's patches: its ink never spills
    into a fifth patch, whatever its offset in the cell."""
    offsets = set()
    for ex in sample[:300]:
        for o in ex.meta["objects"]:
            if o["type"] != "char":
                continue
            x0, y0, x1, y1 = o["box"]
            patches = {(y // 8, x // 8) for y in range(y0, y1) for x in range(x0, x1)}
            assert len(patches) == 4, (ex.meta["index"], o)
            offsets.add((x0 % 32, y0 % 32))
    assert len(offsets) == 9  # three offsets per axis in a cell


def test_locations_cover_the_whole_grid_top_rows_included(sample):
    asked = collections.Counter(ex.meta["location"] for ex in sample if ex.family in ("locate", "read"))
    assert set(asked) == set(LOCATIONS)
    for loc in ("top-left", "top", "top-right"):
        assert asked[loc] >= 15
    # ... and the asked cell is in the top row of the image for those names
    for ex in sample:
        if ex.family in ("locate", "read") and ex.meta["location"].startswith("top"):
            (obj,) = [o for o in ex.meta["objects"] if o["cell"] == list(bench.cell_of(ex.meta["location"]))]
            assert obj["box"][3] <= CELL


def test_answers_are_balanced(sample):
    more = sample + generate("val", 2000, start=1000)
    by_family = collections.defaultdict(collections.Counter)
    for ex in more:
        by_family[ex.family][ex.answer] += 1
    for fam, counts in by_family.items():
        answers = bench.answers_for(fam)
        assert set(counts) == set(answers), fam
        expected = sum(counts.values()) / len(answers)
        assert max(counts.values()) < 1.35 * expected and min(counts.values()) > 0.65 * expected, (fam, counts)
    assert set(bench.answers_for("read")) == {c.lower() for c in CHARS}
    assert bench.answers_for("count") == COUNT_WORDS
    assert set(bench.answers_for("locate")) == set(SHAPES)


# --------------------------------------------------------------------------- tokenizer / processor


@pytest.fixture(scope="module")
def processor():
    # built in code, exactly as the training script builds it (no shipped files needed)
    from vtdsl.eval.train import build_processor

    return build_processor()


def test_tokenizer_covers_the_task(processor, sample):
    tok = processor.tokenizer
    unk = tok.unk_token_id
    for ex in sample[:200]:
        ids = tok(bench.prompt(ex.question, 3))["input_ids"]
        assert unk not in ids and ids[0] == tok.bos_token_id
        assert ids.count(tok.convert_tokens_to_ids("<image>")) == 3
        a = tok(ex.answer, add_special_tokens=False)["input_ids"]
        assert len(a) == 1 and a[0] != unk
        assert tok.decode(a).strip() == ex.answer
    assert tok.padding_side == "left"


def test_processor_matches_fast_path(processor, sample):
    from vtdsl.eval.harness import images_to_pixels

    exs = sample[:4]
    out = processor(images=[e.image for e in exs], text=[bench.prompt(e.question) for e in exs],
                    return_tensors="pt", padding=True)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (out["input_ids"] == image_id).sum(1).tolist() == [144] * 4
    # same arithmetic in a different order: equal to float32 rounding
    torch.testing.assert_close(out["pixel_values"], images_to_pixels([e.image for e in exs]),
                               rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def untrained(processor):
    """tiny-llava-vtbench's architecture with seeded random weights: the harness's
    batching and placeholder logic does not depend on what the model learned."""
    from vtdsl.eval.train import build_model

    model = build_model(processor.tokenizer, seed=0)
    return model.eval(), processor


def test_harness_padding_invariant(untrained, sample):
    from vtdsl.eval.harness import evaluate

    model, processor = untrained
    exs = sample[:10]  # mixed families -> different prompt lengths -> left padding
    batched = evaluate(model, exs, processor, batch_size=10, progress=False, return_predictions=True)
    single = evaluate(model, exs, processor.tokenizer, batch_size=1, progress=False, return_predictions=True)
    assert batched["predictions"] == single["predictions"]


def test_harness_with_fewer_visual_tokens(untrained, sample):
    """The placeholder count is a parameter: a model whose projector emits 64 tokens per image
    is evaluated with image_tokens=64 (and a mismatched count fails loudly)."""
    from vtdsl.eval.harness import evaluate

    model, processor = untrained
    calls = []

    def keep_first_64(module, args, out):
        return out[:, :64]

    def spy(inputs):
        calls.append(inputs["input_ids"].shape)
        return inputs

    handle = model.model.multi_modal_projector.register_forward_hook(keep_first_64)
    try:
        res = evaluate(model, sample[:6], processor, batch_size=3, progress=False,
                       image_tokens=64, prepare_inputs=spy)
        assert res["image_tokens"] == 64 and res["n"] == 6 and len(calls) == 2
        with pytest.raises(Exception, match="do not match"):
            evaluate(model, sample[:2], processor, progress=False)
    finally:
        handle.remove()


def test_scene_questions_are_correct(sample):
    """The extra questions used for multi-turn training are answered correctly too."""
    n = 0
    for ex in sample[:100]:
        for fam, q, a in bench.scene_questions(ex.meta):
            other = bench.Example(ex.image, q, a, fam, ex.meta)
            assert _derive(other) == a, q
            n += 1
        assert (ex.family, ex.question, ex.answer) in bench.scene_questions(ex.meta)
    assert n > 1000


@pytest.mark.slow
def test_training_script_trains_exports_and_resumes(tmp_path):
    """examples/train_tiny_vlm.py end to end on a tiny budget: the exported directory loads
    offline as a LLaVA with its processor, and --resume continues from the checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    root = Path(__file__).resolve().parent.parent
    export, out = tmp_path / "export", tmp_path / "run"
    args = [sys.executable, str(root / "examples" / "train_tiny_vlm.py"), "--steps", "3", "--batch-size", "4",
            "--train-pool", "8", "--questions", "2", "--warmup", "1", "--val-n", "8", "--final-n", "8",
            "--eval-every", "3", "--ckpt-every", "3", "--vit-steps", "2", "--vit-batch-size", "4",
            "--out", str(out), "--export", str(export)]
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    record = json.loads((export / "training.json").read_text())
    assert record["steps"] == 3 and record["examples_seen"] == 12 and record["config"]["vit_steps"] == 2
    assert record["history"][-1]["step"] == 3 and record["history"][-1]["loss"] > 0
    ref = json.loads((export / "reference.json").read_text())
    assert ref["n"] == 200 and len(ref["predictions"]) == 200
    model = LlavaForConditionalGeneration.from_pretrained(export, local_files_only=True)
    processor = LlavaProcessor.from_pretrained(export, local_files_only=True)
    assert model.config.image_seq_length == 144
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    # resume: one more step from the checkpoint of step 3
    subprocess.run([*args[:3], "4", *args[4:], "--resume"], check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert json.loads((export / "training.json").read_text())["steps"] == 4
