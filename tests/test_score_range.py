"""Layer-range scores: `cls@vit.layer8..22 sum` aggregates one score over a range of layers."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.ir import PolicyError, check
from vtdsl.lang import PolicyError as LangError
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")


def test_parses_formats_and_round_trips_through_yaml():
    policy = parse("at vit.out keep cls @ vit.layer8..-2 sum top 64 + mean(cls@vit.layer3..5 max, attn) top 2")
    assert format_policy(policy) == "at vit.out keep cls@vit.layer8..-2 sum top 64 + mean(cls@vit.layer3..5 max, attn) top 2\n"
    assert from_yaml(to_yaml(policy)) == policy


def test_unrolls_into_the_aggregate_of_each_layer():
    plan = check("at vit.out keep cls@vit.layer8..-2 sum top 64", "llava-1.5-7b")
    score = plan.stages[0].terms[0].score
    assert score.op == "sum"
    assert [o.layer for o in score.observations()] == list(range(8, 23))  # vit.layer-2 = 22 of 24
    # a one-layer range is the plain score
    (single,) = check("at vit.out keep cls@vit.layer22..22 max top 64", "llava-1.5-7b").stages[0].terms
    assert single.score.op == "leaf" and single.score.observation.layer == 22


@pytest.mark.parametrize("src, message", [
    ("at vit.out keep cls@vit.layer8..4 sum top 4", "the layer range runs backwards"),
    ("at vit.out keep cls@vit.layer8..40 sum top 4", "vit.layer40 is out of range"),
])
def test_bad_ranges_are_located_check_errors(src, message):
    with pytest.raises(PolicyError) as err:
        check(src, "llava-1.5-7b")
    (diag,) = err.value.diagnostics
    assert message in diag.message and (diag.span.line, diag.span.column) == (1, 21)


@pytest.mark.parametrize("src, message", [
    ("at vit.out keep cls@vit.layer8..22 top 4", "a layer range is aggregated over its layers"),
    ("at vit.out keep cls@foo.layer8..22 sum top 4", "unknown layer range 'foo.layer8..22'"),
])
def test_bad_range_syntax_is_a_parse_error(src, message):
    with pytest.raises(LangError, match=message):
        parse(src)


def test_compiled_keeps_the_top_of_the_summed_cls_attention():
    """Against eager attention weights: sum over ViT layers 4..7 of the CLS row (head
    mean) over the patches; the policy keeps its k largest."""
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)  # peaked attention: no near ties
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[5, 6] + [SPEC.image_token_id] * 576 + [7, 8]])
    with torch.no_grad():
        att = model.model.vision_tower(px, output_attentions=True).attentions
        summed = sum(att[layer][0, :, 0, 1:].mean(0) for layer in range(4, 8)).tolist()
    order = sorted(range(576), key=lambda i: -summed[i])
    # a cut with a clear gap, so float rounding cannot swap the last kept token
    k = next(k for k in range(40, 200) if summed[order[k - 1]] - summed[order[k]] > 1e-5)
    with vc.apply(f"at vit.out keep cls@vit.layer4..7 sum top {k}", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept = vc.kept_tokens(model)["vit.out#0"][0].tolist()
    assert sorted(v - 1 for v in kept) == sorted(order[:k])


def test_a_range_score_is_one_item_of_a_search_space_choice():
    from vtdsl.search.space import parse_space

    space = parse_space("at vit.out keep {cls@vit.layer8..22 sum, cls} top 64")
    texts = sorted(space.candidate(space.point(i)).text for i in range(space.count))
    assert texts == ["at vit.out keep cls top 64\n", "at vit.out keep cls@vit.layer8..22 sum top 64\n"]


def test_ema_weights_each_layer_as_much_as_all_before_it():
    plan = check("at vit.out keep cls@vit.layer8..10 ema top 4\n", "llava-1.5-7b")
    score = plan.stages[0].terms[0].score
    assert score.op == "sum" and score.weights == (0.25, 0.25, 0.5)
    assert [a.observation.layer for a in score.args] == [8, 9, 10]


def test_a_ranged_combination_reads_each_copy_at_its_layer():
    plan = check("at vit.layer4 keep prod(sum(share(cls), share(vsim)), vnorm)@vit.layer1..3 ema top 64",
                 "llava-1.5-7b")
    score = plan.stages[0].terms[0].score
    assert score.weights == (0.25, 0.25, 0.5)
    assert [sorted({o.layer for o in copy.observations()}) for copy in score.args] == [[1], [2], [3]]
    assert format_policy(parse("at vit.layer4 keep prod(cls, vnorm)@vit.layer1..3 ema top 64")) == (
        "at vit.layer4 keep prod(cls, vnorm)@vit.layer1..3 ema top 64\n")


@pytest.mark.parametrize("src, message, column", [
    ("at vit.layer4 keep prod(cls@vit.layer1, vnorm)@vit.layer0..3 ema top 64",
     "'cls@vit.layer1' names its own layer inside a ranged combination", 29),
    ("at vit.layer4 keep prod(cls@vit.layer0..1 sum, vnorm)@vit.layer0..3 ema top 64",
     "names its own layer inside a ranged combination", 29),
])
def test_a_ranged_combination_gives_its_scores_their_layers(src, message, column):
    with pytest.raises(PolicyError) as err:
        check(src, "llava-1.5-7b")
    diag = err.value.diagnostics[0]
    assert message in diag.message and diag.span.column == column


def test_a_ranged_combination_reports_a_bad_body_once():
    with pytest.raises(PolicyError) as err:
        check("at vit.layer6 keep prod(cls@vit.layer3, vnorm)@vit.layer0..5 ema top 64", "llava-1.5-7b")
    assert len(err.value.diagnostics) == 1
