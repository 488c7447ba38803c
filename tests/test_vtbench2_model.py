"""tiny-llava-vtbench2's geometry and cost structure (issue 22 item 1): 576 visual tokens
from the second-to-last layer, a tower <= 6 % of the unpruned prefill FLOPs at vtbench
v2's mean prompt (the cost model, and FlopCounterMode on the meta model), >= 16 LLM
layers, <= 25 MB of weights; the zoo's counts check unchanged on it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtdsl.cost import estimate
from vtdsl.eval import bench2
from vtdsl.eval.bench import prompt
from vtdsl.ir import check
from vtdsl.lang.errors import PolicyError
from vtdsl.models import get_spec

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny-llava-vtbench2"


@pytest.fixture(scope="module")
def spec():
    return get_spec(NAME)


@pytest.fixture(scope="module")
def mean_prompt():
    from vtdsl.eval.train2 import build_tokenizer

    tok = build_tokenizer()
    lengths = [len(tok(prompt(e.question, 0))["input_ids"]) for e in bench2.generate("val", 350)]
    return round(sum(lengths) / len(lengths))


def test_geometry_and_size(spec):
    config = spec.config()
    assert spec.image_tokens == 576 and spec.grid == (24, 24)
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert spec.vit.layers == 4 and spec.llm.layers == 16
    model = spec.build("meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == spec.param_count() and n * 4 <= 25_000_000  # float32 fits: no float16 storage needed
    assert NAME in [s.name for s in __import__("vtdsl.models", fromlist=["list_specs"]).list_specs()]


def _counted(model, spec, text_tokens: int) -> tuple[int, int]:
    """(tower, whole prefill) FLOPs of one unpruned forward on meta, by FlopCounterMode."""
    ids = torch.cat([torch.full((1, spec.image_tokens), spec.image_token_id),
                     torch.full((1, text_tokens), 7)], dim=1).to("meta")
    pixels = torch.zeros(1, 3, spec.image_size, spec.image_size, device="meta")
    off = mock.patch("transformers.models.llava.modeling_llava.torch_compilable_check", lambda *a, **k: None)
    with off, torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
    tower = sum(counter.get_flop_counts().get("LlavaForConditionalGeneration.model.vision_tower", {}).values())
    return tower, counter.get_total_flops()


def test_tower_share_at_the_mean_prompt(spec, mean_prompt):
    assert 12 <= mean_prompt <= 24
    report = estimate(check("at vit.out keep cls top 100%", spec), text_tokens=mean_prompt)
    share = report.baseline.vit / report.baseline.flops
    assert share <= 0.06
    tower, total = _counted(spec.build("meta"), spec, mean_prompt)
    assert tower / total <= 0.06
    # the cost model's count is FlopCounterMode's (matmuls and attention), part and whole
    assert abs(report.baseline.vit - tower) / tower < 0.01
    assert abs(report.baseline.flops - total) / total < 0.01


def test_zoo_counts_run_unchanged_and_layers_map_by_depth(spec):
    unchanged, out_of_range = [], []
    for path in sorted((ROOT / "policies").glob("*.vt")):
        if 'model "llava-1.5-7b"' not in path.read_text(encoding="utf-8"):
            continue  # the image zoo, written for LLaVA-1.5's 576 tokens (video policies name a video model)
        try:
            plan = check(path, spec)
        except PolicyError as err:
            assert "is out of range" in err.message, (path.name, err.message)  # layers only, never counts
            out_of_range.append(path.stem)
            continue
        unchanged.append(path.stem)
        assert plan.visual_tokens_to_llm <= 576
    # every count of the zoo (written for 576 tokens) holds; the 64-token settings keep 64
    assert {"visionzip-64", "holov", "dart-64", "fastv", "random-64", "divprune"} <= set(unchanged)
    assert check(ROOT / "policies" / "visionzip-64.vt", spec).visual_tokens_to_llm == 64
    # what fails names a layer the 4-layer tower or the 16-layer LLM lacks: `--rescale` maps those
    assert {"pdrop-64", "sparsevlm-64", "tome-64", "turbo-64"} <= set(out_of_range)
