"""FLOPs of a compiled prefill, counted by torch, equal the cost model's `hf` figure.

Eager attention: on CPU, FlopCounterMode does not count the fused sdpa kernel."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import parse
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
TEXT = [5, 6, 7, 8, 9, 10, 11]  # 3 before the image, 4 after

POLICIES = [
    "",
    "at llm.layer2 keep text top 50%",
    "at vit.layer2 keep cls top 8",
    "at vit.out keep cls top 8 then merge rest into 2",
    "at vit.out keep cls_token + cls top 7 then merge rest into 2\nat llm.layer1 keep text top 50%",
    "at llm.layer2 keep attn(visual) top 50%\nat llm.layer3 keep attn(visual)@llm.layer3 top 50%",
    # every scorer and selector kind once
    "at vit.layer1 keep attn top 24 + diverse 8 + buffers 8\n"
    "at vit.out merge 10\n"
    "at llm.layer1 keep text(all) top 12 + uniform 4 then merge rest into 3\n"
    "at llm.layer3 keep norm top 6 + random 2 seed 3",
    "at vit.layer1 pool 2x2; at llm.layer2 keep attn top 8 per region 2x2",
    # scores read on a layer's own input (PDrop), one query row and all rows
    "at llm.layer1 keep text@llm.layer1 top 50%\nat llm.layer3 keep text(all)@llm.layer3 top 25%",
    # FrameFusion's last 4 rows, after a layer and on a layer's input (every row projected)
    "at llm.layer1 keep text(last4) top 50%\nat llm.layer2 keep text(last4)@llm.layer2 top 50%",
]


@pytest.fixture(scope="module")
def model():
    return SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()


@pytest.mark.parametrize("src", POLICIES)
@pytest.mark.parametrize("logits", ["all", "last"])
def test_counted_prefill_flops_equal_cost_model(model, src, logits):
    plan = check(parse(src), SPEC)
    ids = torch.tensor([TEXT[:3] + [SPEC.image_token_id] * SPEC.image_tokens + TEXT[3:]])
    px = torch.randn(1, 3, SPEC.image_size, SPEC.image_size, generator=torch.Generator().manual_seed(0))
    with vc.apply(plan, model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=px, logits_to_keep=1 if logits == "last" else 0)
    assert counter.get_total_flops() == estimate(plan, text_tokens=len(TEXT), logits=logits).flops
