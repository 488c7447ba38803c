"""`vtdsl eval` and `vtdsl show` on a vtbench-shaped LLaVA (seeded random weights: these
tests check the plumbing and the numbers it reports, not what a trained model knows)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vtdsl.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from vtdsl.eval.train import build_model, build_processor

    path = tmp_path_factory.mktemp("vtbench-model")
    processor = build_processor()
    build_model(processor.tokenizer, seed=0).save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_eval_json_reports_every_policy_against_the_unpruned_model(model_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from vtdsl.eval.bench import generate
    from vtdsl.eval.harness import evaluate

    policy = tmp_path / "p.vt"
    policy.write_text('policy "half"\nat vit.out keep cls top 72\n')
    result = run(["eval", policy, "--model", model_dir, "--n", 20, "--split", "val", "--baselines", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["examples"] == 20 and data["split"] == "val"
    names = [r["policy"] for r in data["results"]]
    # 72 of 12x12 tokens; the square pool nearest 72 tokens is 2x2 (36; 1x1 keeps 144)
    assert names == ["unpruned", "half", "random-72", "pool-2x2"]
    rows = {r["policy"]: r for r in data["results"]}
    assert [rows[n]["visual_tokens_to_llm"] for n in names] == [144, 72, 72, 36]
    for r in data["results"]:
        assert set(r) == {"policy", "visual_tokens_to_llm", "bound", "accuracy", "per_family", "retention",
                          "flops_ratio", "prefill_ms_per_example", "latency_ratio"}
        assert r["bound"] is False
        assert set(r["per_family"]) == {"color", "count", "exists", "locate", "read"}
    assert rows["unpruned"]["flops_ratio"] == 1.0 and rows["unpruned"]["latency_ratio"] == 1.0
    assert rows["pool-2x2"]["flops_ratio"] < rows["half"]["flops_ratio"] < 1.0
    # the unpruned accuracy is the harness's own on the same examples
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    direct = evaluate(model, generate("val", 20), LlavaProcessor.from_pretrained(model_dir), progress=False)
    assert rows["unpruned"]["accuracy"] == direct["overall"]
    for r in data["results"]:
        assert r["retention"] == (r["accuracy"] / direct["overall"] if direct["overall"] else None)


def test_eval_text_table_and_bad_model(model_dir, tmp_path):
    policy = tmp_path / "p.vt"
    policy.write_text('policy "pooled"\nat vit.out pool 3x3\n')
    result = run(["eval", policy, "--model", model_dir, "--n", 5])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["policy", "tokens", "FLOPs"]
    assert lines[3].split()[:2] == ["pooled", "16"]
    missing = run(["eval", policy, "--model", tmp_path / "nowhere"])
    assert missing.exit_code == 2 and "no trained vtbench model" in missing.stderr


def test_eval_of_an_adaptive_count_reports_its_bound(model_dir, tmp_path):
    policy = tmp_path / "p.vt"
    policy.write_text('policy "iqr"\nat vit.out keep cls top 25% by outliers\n')
    result = run(["eval", policy, "--model", model_dir, "--n", 6, "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["policy"]: r for r in json.loads(result.stdout)["results"]}
    assert rows["iqr"]["bound"] is True and rows["iqr"]["visual_tokens_to_llm"] == 36  # 25% of 12x12
    table = run(["eval", policy, "--model", model_dir, "--n", 6]).stdout.splitlines()
    assert table[3].split()[:3] == ["iqr", "≤", "36"]


def _count(png: Image.Image, panel: int, colour) -> int:
    from vtdsl.eval.show import CELL, GAP, HEADER

    side = 12 * CELL
    x = GAP + panel * (side + GAP)
    crop = np.asarray(png.crop((x, HEADER, x + side, HEADER + side)))
    return int((crop == np.array(colour)).all(-1).sum())


def test_show_png_cells_match_the_kept_counts(model_dir, tmp_path):
    from vtdsl.eval.show import CELL, DROPPED, KEPT, MERGED

    policy = tmp_path / "p.vt"
    policy.write_text('policy "two"\nat vit.layer2 keep cls top 72\nat llm.layer1 keep text top 24\n')
    out = tmp_path / "kept.png"
    result = run(["show", policy, "--model", model_dir, "--example", 3, "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert [(s["site"], s["kept"], s["dropped"]) for s in stages] == [("vit.layer2", 72, 72), ("llm.layer1", 24, 48)]
    png = Image.open(out).convert("RGB")
    # panels: image, vit.layer2 status, its scores, llm.layer1 status, its scores
    assert _count(png, 1, KEPT) == 72 * CELL * CELL and _count(png, 1, DROPPED) == 72 * CELL * CELL
    assert _count(png, 3, KEPT) == 24 * CELL * CELL and _count(png, 3, DROPPED) == 48 * CELL * CELL
    assert _count(png, 1, MERGED) == 0


def test_show_merge_colours_and_image_input(model_dir, tmp_path):
    from vtdsl.eval.show import CELL, KEPT, MERGED

    policy = tmp_path / "p.vt"
    policy.write_text('policy "vz"\nat vit.out keep cls top 20 then merge rest into 4\n')
    picture = tmp_path / "in.png"
    Image.new("RGB", (200, 150), (200, 30, 30)).save(picture)
    out = tmp_path / "kept.png"
    result = run(["show", policy, "--model", model_dir, "--image", picture, "-o", out])
    assert result.exit_code == 0, result.output
    png = Image.open(out).convert("RGB")
    assert _count(png, 1, KEPT) == 24 * CELL * CELL and _count(png, 1, MERGED) == 120 * CELL * CELL
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run(["show", policy, "--model", model_dir, "--image", bad, "-o", tmp_path / "x.png"])
    assert result.exit_code == 2 and "cannot read image" in result.stderr
    assert not (tmp_path / "x.png").exists()
    both = run(["show", policy, "--model", model_dir, "-o", out])
    assert both.exit_code == 2


def test_recording_is_off_on_the_hot_path(model_dir):
    """A compiled model records stage inputs and scores only when asked (vtdsl show)."""
    from transformers import LlavaForConditionalGeneration

    from vtdsl import compiler
    from vtdsl.models import get_spec

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True).eval()
    spec = get_spec(str(model_dir))
    ids = torch.cat([torch.tensor([[2]]), torch.full((1, 144), model.config.image_token_id), torch.tensor([[5, 6]])], 1)
    with compiler.apply("at vit.out keep cls top 20", model, spec=spec):
        with torch.inference_mode():
            model(input_ids=ids, pixel_values=torch.zeros(1, 3, 96, 96))
        log = compiler.compiled(model).log
        assert log.kept and not log.inputs and not log.scores
