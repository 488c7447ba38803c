"""Every policy of the zoo (policies/*.vt) runs for real on tiny-llava, which has
llava-1.5's geometry (24 ViT layers, 576 patches, feature layer -2, 32 LLM layers) with
tiny widths, so layer indices and token counts are the ones the zoo was written for."""

from __future__ import annotations


import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.models import get_spec

from plain_refs import image_zoo
from tiny_clip import text_encoder_kwargs

ZOO = image_zoo()  # video methods (evs.vt) run on video in tests/conformance/test_evs.py
IMG = 255


def tiny_llava(attn: str):
    return get_spec("tiny-llava").build(device="cpu", attn_implementation=attn, seed=0).eval()


@pytest.fixture(scope="module")
def models():
    return {"sdpa": tiny_llava("sdpa"), "eager": tiny_llava("eager")}


@pytest.mark.slow
@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_zoo_policy_runs_and_matches_its_plan(models, path):
    # the second prompt is left-padded, with 5 real text tokens (DART takes 4 text pivots)
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10, 11], [0, 0, 5, 6, 7, 8] + [IMG] * 576 + [8]])
    mask = (ids != 0).long()
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    model = models["sdpa"]
    with vc.apply(path, model, **text_encoder_kwargs(path)):
        plan = vc.compiled(model).plan
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
            gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=2,
                                 do_sample=False)
    text = 7
    cached = [out.cache.layers[j].keys.shape[-2] for j in range(32)]
    if plan.adaptive:  # counts decided per call: within the plan's bounds (the cost model charges the most)
        fewest = min(s.fewest_out for s in plan.stages)
        assert all(text + fewest <= c <= text + v for c, v in zip(cached, plan.llm_visual))
    else:
        assert cached == [text + v for v in plan.llm_visual]
    assert gen.shape[1] == ids.shape[1] + 2 and torch.equal(gen[:, :-2], ids)  # the caller's prompt, then 2 new

    # counted FLOPs of a batch-1 prefill (eager: the CPU sdpa kernel is not counted) = cost model
    model = models["eager"]
    with vc.apply(path, model, **text_encoder_kwargs(path)), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids[:1], pixel_values=px[:1])
    if plan.adaptive:
        assert counter.get_total_flops() <= estimate(plan, text_tokens=text, logits="all").flops
    else:
        assert counter.get_total_flops() == estimate(plan, text_tokens=text, logits="all").flops
