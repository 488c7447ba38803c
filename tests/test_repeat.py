"""Schedules: `every N layers from A to B <action>` unrolls into one stage per layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtdsl.ir import PolicyError, check
from vtdsl.lang import PolicyError as LangError
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_parses_formats_canonically_and_round_trips_through_yaml():
    policy = parse("every 1 layers from vit.layer2 to vit.layer-2 keep cls top 80%\n"
                   "every 3 layers from llm.layer2 to llm.layer11 keep text top 50%")
    assert format_policy(policy) == ("every layer from vit.layer2 to vit.layer-2 keep cls top 80%\n"
                                     "every 3 layers from llm.layer2 to llm.layer11 keep text top 50%\n")
    assert from_yaml(to_yaml(policy)) == policy
    written = from_yaml("stages:\n  - {every: 3, from: llm.layer2, to: llm.layer11, keep: text top 50%}\n")
    assert written.stages[0] == policy.stages[1]


def test_unrolls_with_percentages_compounding_per_layer():
    plan = check("every 2 layers from vit.layer2 to vit.layer-2 keep cls top 80%", "llava-1.5-7b")
    # layers 2, 4, ..., 22 (vit.layer-2 = 22 of 24); each keeps round-half-up 80% of its input
    n, expected = 576, []
    for layer in range(2, 23, 2):
        out = int(n * 4 / 5 + 0.5)
        expected.append((f"vit.layer{layer}", n, out))
        n = out
    assert [(s.site.text(), s.tokens_in, s.tokens_out) for s in plan.stages] == expected
    assert plan.projector_tokens == n


@pytest.mark.parametrize("name", ["tome", "tome-128", "tome-64"])
def test_tome_schedules_equal_one_stage_per_block(name):
    """ToMe spreads 576 - target merges as evenly as possible over blocks 0..22 (stages
    at vit.layer1..23), larger r first."""
    target = {"tome": 192, "tome-128": 128, "tome-64": 64}[name]
    merges, blocks = 576 - target, 23
    explicit = "\n".join(f"at vit.layer{i + 1} merge {merges // blocks + (i < merges % blocks)}" for i in range(blocks))
    unrolled = check(ROOT / "policies" / f"{name}.vt", "llava-1.5-7b")
    reference = check(explicit, "llava-1.5-7b")
    assert [(s.site, s.action, s.tokens_in, s.tokens_out, s.merge_rest) for s in unrolled.stages] == \
        [(s.site, s.action, s.tokens_in, s.tokens_out, s.merge_rest) for s in reference.stages]
    assert unrolled.projector_tokens == reference.projector_tokens == target


@pytest.mark.parametrize("src, message, column", [
    ("every 2 layers from vit.layer2 to llm.layer4 merge 2", "a schedule stays in one tower", 35),
    ("every layer from vit.layer8 to vit.layer4 merge 2", "the schedule runs backwards", 32),
    ("every layer from vit.layer8 to vit.layer40 merge 2", "vit.layer40 is out of range", 32),
    ("every layer from vit.layer8 to vit.out merge 2", "vit.out is one site", 32),
])
def test_bad_schedules_are_located_check_errors(src, message, column):
    with pytest.raises(PolicyError) as err:
        check(src, "llava-1.5-7b")
    (diag,) = err.value.diagnostics
    assert message in diag.message
    assert (diag.span.line, diag.span.column) == (1, column)


@pytest.mark.parametrize("src, message", [
    ("every 0 layers from vit.layer2 to vit.layer4 merge 2", "needs a whole number of layers"),
    ("every 2 from vit.layer2 to vit.layer4 merge 2", "expected: 'layers'"),
    ("every layer from vit.layer2 vit.layer4 merge 2", "expected: 'to' and a site"),
])
def test_bad_schedule_syntax_is_a_located_parse_error(src, message):
    with pytest.raises(LangError) as err:
        parse(src)
    assert message in str(err.value)


def test_a_schedule_later_checks_like_its_unrolled_stages():
    # the third unrolled stage asks for more than is left: reported at the schedule
    with pytest.raises(PolicyError) as err:
        check("every 4 layers from vit.layer4 to vit.layer12 merge 150", "llava-1.5-7b")
    diag = err.value.diagnostics[0]
    assert "merge 150" in diag.message and (diag.span.line, diag.span.column) == (1, 53)  # the quantity


def test_unrolled_findings_are_reported_once_and_at_most_three_per_place():
    with pytest.raises(PolicyError) as err:
        check("every layer from llm.layer2 to llm.layer4 keep cls@llm.layer2..4 sum top 50%", "llava-1.5-7b")
    messages = [d.message for d in err.value.diagnostics]
    assert len(messages) == len(set(messages)) and 1 <= len(messages) <= 3
    assert all("only available at ViT layers" in m for m in messages)


def test_a_schedule_cannot_repeat_drop_all():
    with pytest.raises(PolicyError, match="a schedule cannot repeat it"):
        check("every layer from llm.layer2 to llm.layer5 drop all", "llava-1.5-7b")
    assert check("every layer from llm.layer2 to llm.layer2 drop all", "llava-1.5-7b").llm_visual[2] == 0


def test_a_schedule_may_aggregate_a_score_over_a_range():
    plan = check("every 2 layers from vit.layer4 to vit.layer8 keep cls@vit.layer1..3 mean top 90%", "llava-1.5-7b")
    assert [(s.tokens_in, s.tokens_out) for s in plan.stages] == [(576, 518), (518, 466), (466, 419)]
    assert [o.layer for o in plan.stages[0].terms[0].score.observations()] == [1, 2, 3]


@pytest.mark.parametrize("text, message", [
    ("stages:\n  - {every: \u00b2, from: vit.layer2, to: vit.layer4, merge: 4}\n", "'every' takes a whole number"),
    ("stages:\n  - {every: 2, to: vit.layer4, merge: 4}\n", "a schedule needs 'from: <site>'"),
    ("stages:\n  - {every: 2, at: vit.layer2, from: vit.layer2, to: vit.layer4, merge: 4}\n", "not both"),
    ("stages:\n  - {from: [vit.layer2], to: vit.layer4, merge: 4}\n", "'from' must be a single value"),
])
def test_bad_yaml_schedules_are_located_errors(text, message):
    with pytest.raises(LangError, match=message):
        from_yaml(text)


def test_every_unrolled_stage_reads_its_own_layer():
    """Each stage of a schedule reads the layer before it (a score without @), not the
    last stage's: the unrolled stages must not share one score."""
    plan = check("every 2 layers from vit.layer2 to vit.layer6 keep cls top 90%\n"
                 "every layer from llm.layer2 to llm.layer4 keep text top 90%", "llava-1.5-7b")
    assert [(s.site.text(), s.terms[0].score.observation.layer) for s in plan.stages] == [
        ("vit.layer2", 1), ("vit.layer4", 3), ("vit.layer6", 5), ("llm.layer2", 1), ("llm.layer3", 2),
        ("llm.layer4", 3)]


def test_an_llm_schedule_runs_like_its_stages_written_out():
    import torch

    import vtdsl.compiler as vc
    from vtdsl.models import get_spec

    spec = get_spec("tiny-llava")
    model = spec.build(device="cpu", attn_implementation="eager", seed=0).eval()
    ids = torch.tensor([[5, 6] + [spec.image_token_id] * 576 + [8, 9, 10]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(12))
    outs = []
    for src in ("every layer from llm.layer2 to llm.layer3 keep text top 50%",
                "at llm.layer2 keep text top 50%\nat llm.layer3 keep text top 50%"):
        with vc.apply(src, model), torch.no_grad():
            outs.append((model(input_ids=ids, pixel_values=px).logits, vc.kept_tokens(model)))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert [v.tolist() for v in outs[0][1].values()] == [v.tolist() for v in outs[1][1].values()]
