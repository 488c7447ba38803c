"""`vtdsl compile` and examples/compile_llava.py."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vtdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
P = (336 // 14) ** 2  # tiny-llava's image placeholders: 24 x 24 patches, CLS dropped


@pytest.fixture()
def policy(tmp_path):
    path = tmp_path / "fastv.vt"
    path.write_text('policy "fastv"\nat vit.out keep cls top 16\nat llm.layer2 keep text top 50%\n')
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compile_meta_writes_manifest_and_listing(policy, tmp_path):
    out = tmp_path / "build"
    result = run("compile", policy, "--model", "tiny-llava", "-o", out)
    assert result.exit_code == 0, result.output
    assert "llm.layer2" in result.output and "model.language_model.layers.2" in result.output
    assert f"{P} -> 16" in result.output and "FLOPs (hf)" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {"name": "tiny-llava", "class": "LlavaForConditionalGeneration",
                                 "weights": None, "device": "meta"}
    assert [(s["site"], s["module"], s["tokens_in"], s["tokens_out"]) for s in manifest["stages"]] == [
        ("vit.out", "model.multi_modal_projector", P, 16),
        ("llm.layer2", "model.language_model.layers.2", 16, 8),
    ]
    assert manifest["visual_tokens"]["image_placeholders"] == {"before": P, "after": 16}
    assert manifest["mechanism"] == {"vit": "fx", "llm": "hooks"}
    assert manifest["cost"]["flops"]["policy"] < manifest["cost"]["flops"]["baseline"]
    listing = (out / "listing.txt").read_text()
    assert "fx graph of model.vision_tower.encoder" in listing and "vtdsl_vit_begin" in listing


def test_compile_json_and_real_weights(policy, tmp_path):
    from vtdsl.models import get_spec

    weights = tmp_path / "tiny"
    get_spec("tiny-llava").build(device="cpu", seed=0).save_pretrained(weights)
    result = run("compile", policy, "--model", weights, "--weights", weights, "--json", "--text-tokens", "8")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["model"]["device"] == "cpu" and manifest["model"]["weights"] == str(weights)
    assert manifest["cost"]["text_tokens"] == 8


def test_compile_defaults_to_the_policys_model_line(tmp_path):
    path = tmp_path / "p.vt"
    path.write_text('model "tiny-llava"\nat vit.layer2 keep cls top 8\n')
    result = run("compile", path, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.output)
    assert manifest["model"]["name"] == "tiny-llava" and manifest["stages"][0]["tokens_out"] == 8
    assert manifest["visual_tokens"]["image_placeholders"] == {"before": P, "after": 8}


def test_compile_exit_codes(tmp_path):
    over = tmp_path / "over.vt"
    over.write_text("budget flops <= 1%\nat llm.layer2 keep text top 50%\n")
    result = run("compile", over, "--model", "tiny-llava")
    assert result.exit_code == 1 and "EXCEEDED" in result.output
    bad = tmp_path / "bad.vt"
    bad.write_text("at llm.layer32 keep text top 50%\n")  # layers 0..31
    result = run("compile", bad, "--model", "tiny-llava")
    assert result.exit_code == 2 and "bad.vt:1:" in result.output and "Traceback" not in result.output
    result = run("compile", bad, "--model", "no-such-model")
    assert result.exit_code == 2
    help_text = run("compile", "--help").output
    assert "Example:" in help_text and "--weights" in help_text


def test_example_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compile_llava.py"])
    runpy.run_path(str(ROOT / "examples" / "compile_llava.py"), run_name="__main__")
    out = capsys.readouterr().out
    # 6 text tokens; 54 + 10 visual tokens leave the ViT, FastV halves them from llm.layer2 on
    assert f"KV-cache length per LLM layer: {[6 + 64] * 2 + [6 + 32] * 30}" in out
    assert "vit.out#0" in out and "FLOPs (hf)" in out


def test_model_families_example_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["model_families.py"])
    runpy.run_path(str(ROOT / "examples" / "model_families.py"), run_name="__main__")
    out = capsys.readouterr().out
    # half of each image's own count: 88 and 44 tokens (LLaVA-NeXT), 64 and 48 (Qwen2.5-VL)
    for n in (88, 44, 64, 48):
        assert f"kept {n // 2} of {n} visual tokens" in out
    rows = {tuple(line.split()[:3]): " ".join(line.split()[3:]) for line in out.splitlines() if " on " in line}
    # VisionZip keeps CLS + 161 dominant + 30 contextual = 192 per crop, x 5 crops on LLaVA-NeXT; FastV keeps all
    # before the LLM; towers without a CLS token refuse VisionZip by name
    assert rows["visionzip", "on", "llava-next-7b"].startswith("960 visual tokens")
    assert rows["fastv", "on", "llava-1.5-7b"].startswith("576 visual tokens")
    assert rows["hiprune-64", "on", "gemma-3-4b"].startswith("64 visual tokens")
    assert "no CLS token" in rows["visionzip", "on", "qwen3-vl-8b"]
    assert len({model for _, _, model in rows}) == 9
