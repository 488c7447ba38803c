"""Head aggregation of attention scores: `cls(max)`, `text(all, sum)`, `attn(visual, max)`."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import PolicyError as LangError
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import peaked

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


def test_parses_formats_and_round_trips():
    policy = parse("at vit.out keep cls( max ) top 4 + mean(cls(sum)@vit.layer3, attn(max)) top 2\n"
                   "at llm.layer2 keep text(all, max) top 3 + attn(visual, sum) top 1")
    assert format_policy(policy) == ("at vit.out keep cls(max) top 4 + mean(cls(sum)@vit.layer3, attn(max)) top 2\n"
                                     "at llm.layer2 keep text(all, max) top 3 + attn(visual, sum) top 1\n")
    assert from_yaml(to_yaml(policy)) == policy


@pytest.mark.parametrize("src, message, column", [
    ("at vit.out keep norm(max) top 4", "'norm' reads no attention heads", 22),
    ("at vit.out keep cls(max, sum) top 4", "one head aggregate per score", 26),
])
def test_misuse_is_a_located_parse_error(src, message, column):
    with pytest.raises(LangError) as err:
        parse(src)
    (diag,) = err.value.diagnostics
    assert message in diag.message and diag.span.column == column


def test_is_part_of_the_observation_and_costs_the_same():
    plan = check("at vit.out keep cls(max) top 4 + cls top 4", "llava-1.5-7b")
    assert [o.heads for o in plan.observations] == ["max", "mean"]
    one = estimate(check("at vit.out keep cls(max) top 64", "llava-1.5-7b"))
    mean = estimate(check("at vit.out keep cls top 64", "llava-1.5-7b"))
    assert one.policy.flops == mean.policy.flops  # the same q.k rows; reducing heads is free


def _top_with_gap(values: list[float], lo: int) -> tuple[int, list[int]]:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    k = next(k for k in range(lo, len(values) - 1) if values[order[k - 1]] - values[order[k]] > 1e-6)
    return k, sorted(order[:k])


def test_compiled_cls_max_and_text_sum_match_eager_attention():
    model = peaked(SPEC)
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10, 11]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        vit_att = model.model.vision_tower(px, output_attentions=True).attentions
        llm_att = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                        output_attentions=True).attentions
    # ViT: the CLS row of the feature layer, max over heads
    cls_max = vit_att[SPEC.feature_layer_index][0, :, 0, 1:].amax(0).tolist()
    k_vit, want_vit = _top_with_gap(cls_max, 60)
    # LLM: attention from every text row of layer 1 to the image columns, summed over heads,
    # averaged over the text rows
    text_rows = [0, 1, 2, 579, 580, 581, 582]
    img = list(range(3, 579))
    text_sum = llm_att[1][0][:, text_rows][:, :, img].sum(0).mean(0).tolist()
    k_llm, want_llm = _top_with_gap(text_sum, 20)
    policy = f"at vit.out keep cls(max) top {k_vit}"
    with vc.apply(policy, model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept_vit = vc.kept_tokens(model)["vit.out#0"][0].tolist()
    assert sorted(v - 1 for v in kept_vit) == want_vit
    with vc.apply(f"at llm.layer2 keep text(all, sum) top {k_llm}", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept_llm = vc.kept_tokens(model)["llm.layer2#0"][0].tolist()
    assert sorted(kept_llm) == [img[i] for i in want_llm]


def test_a_layer_range_keeps_the_head_aggregate_and_rope_option():
    plan = check("at vit.out keep cls(max)@vit.layer8..10 sum top 4\n"
                 "at llm.layer4 keep text(no_rope, top 2 heads)@llm.layer1..2 mean top 2", "llava-1.5-7b")
    assert [(o.layer, o.heads, o.rope) for o in plan.observations] == [
        (8, "max", True), (9, "max", True), (10, "max", True), (1, 2, False), (2, 2, False)]
