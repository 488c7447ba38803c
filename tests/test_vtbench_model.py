"""The shipped tiny-llava-vtbench: small, registered, as accurate as recorded, and its
accuracy signal is real (dropping the top half of the image hurts top-row questions)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vtdsl.cli import main
from vtdsl.eval import bench
from vtdsl.eval.harness import evaluate
from vtdsl.models import get_spec, list_specs
from vtdsl.models.vtbench import DATA_DIR, NAME, load_tiny_vtbench

MAX_SHIPPED_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def shipped():
    model, processor = load_tiny_vtbench()
    return model, processor


@pytest.fixture(scope="module")
def reference():
    return json.loads((DATA_DIR / "reference.json").read_text())


def test_shipped_files_are_small_offline_and_registered():
    files = [p for p in DATA_DIR.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "reference.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_BYTES
    assert NAME in [s.name for s in list_specs()]
    spec = get_spec(NAME)
    assert (spec.image_tokens, spec.vit.layers, spec.llm.layers, spec.has_cls) == (144, 5, 4, True)


def test_spec_build_loads_the_trained_weights(shipped):
    model, _ = shipped
    built = get_spec(NAME).build(device="cpu", dtype="float32")
    for (name, a), (_, b) in zip(model.state_dict().items(), built.state_dict().items()):
        assert torch.equal(a, b), name


def test_training_record_meets_the_targets():
    """The recorded run: under 60 minutes on the 2-core CPU, >= 90 % test accuracy
    overall and >= 80 % on every family (2000 test examples)."""
    record = json.loads((DATA_DIR / "training.json").read_text())
    assert record["train_minutes"] < 60
    test = record["final"]["test"]
    assert test["n"] == 2000 and test["overall"] >= 0.90
    assert min(test["per_family"].values()) >= 0.80, test["per_family"]


def test_unpruned_accuracy_on_the_fixed_slice_matches_the_record(shipped, reference):
    model, processor = shipped
    examples = bench.generate(reference["split"], reference["n"], start=reference["start"])
    res = evaluate(model, examples, processor, batch_size=50, progress=False, return_predictions=True)
    assert abs(res["overall"] - reference["overall"]) <= reference["tolerance"]
    for family, acc in reference["per_family"].items():
        assert abs(res["per_family"][family] - acc) <= reference["family_tolerance"], family
    agree = sum(a == b for a, b in zip(res["predictions"], reference["predictions"])) / len(examples)
    assert agree >= 1 - reference["tolerance"]


def _location_questions(row: int, n: int = 150) -> list[bench.Example]:
    """Locate / read questions about a cell of grid row `row` (0 = top), from the val split."""
    out, i = [], 0
    while len(out) < n:
        ex = bench.make_example("val", i)
        i += 1
        if ex.family in ("locate", "read") and bench.cell_of(ex.meta["location"])[0] == row:
            out.append(ex)
    return out


def test_keeping_only_the_bottom_half_loses_top_row_localisation(shipped):
    """The LLM sees only the bottom 6 of 12 patch rows (72 tokens): questions about the
    top row of cells collapse, questions about the bottom row barely move."""
    model, processor = shipped
    top, bottom = _location_questions(0), _location_questions(2)
    base_top = evaluate(model, top, processor, batch_size=50, progress=False)["overall"]
    base_bottom = evaluate(model, bottom, processor, batch_size=50, progress=False)["overall"]
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: out[:, 72:])
    try:
        cut_top = evaluate(model, top, processor, batch_size=50, progress=False, image_tokens=72)["overall"]
        cut_bottom = evaluate(model, bottom, processor, batch_size=50, progress=False, image_tokens=72)["overall"]
    finally:
        handle.remove()
    assert base_top >= 0.8 and base_bottom >= 0.8
    assert cut_top < base_top - 0.3
    assert cut_bottom > base_bottom - 0.15


def test_check_and_eval_accept_the_registered_name(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["check", "policies/fastv.vt", "--model", NAME, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["visual_tokens_to_llm"] == 144
