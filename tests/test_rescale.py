"""Portable policies (issue 22 item 6): a policy written for another model is refused by
`eval` / `search`, or rescaled with `--rescale` (vtdsl.ir.rescale: counts by the token
ratio, layers by relative depth). Expected figures are worked by hand from the rule:
llava-1.5-7b has 576 visual tokens, 24 ViT and 32 LLM layers; tiny-llava-vtbench 144, 5
and 4; tiny-llava-vtbench2 576, 4 and 16."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from vtdsl.cli import main
from vtdsl.ir import check
from vtdsl.ir.rescale import portable, rescale
from vtdsl.lang import format_policy, parse
from vtdsl.lang.errors import PolicyError
from vtdsl.models import get_spec

ROOT = Path(__file__).resolve().parent.parent
LLAVA, V1, V2 = "llava-1.5-7b", "tiny-llava-vtbench", "tiny-llava-vtbench2"


def _stages(text: str, target: str, source: str = LLAVA) -> list[str]:
    done = rescale(parse(text), get_spec(source), get_spec(target))
    return [line for line in format_policy(done.policy).splitlines() if line.startswith("at ")]


def test_counts_scale_by_the_token_ratio_half_up():
    # 53 * 144/576 = 13.25 -> 13; 10 * 1/4 = 2.5 -> 3 (half up)
    src = 'model "llava-1.5-7b"\nat vit.out keep cls_token + cls top 53 then add rest into 10 by keys\n'
    assert _stages(src, V1) == ["at vit.out keep cls_token + cls top 13 then add rest into 3 by keys"]
    assert _stages(src, V2) == ["at vit.out keep cls_token + cls top 53 then add rest into 10 by keys"]
    # a count never rounds to nothing: 1 * 1/4 -> 1; percentages are relative already
    assert _stages("at vit.out keep cls top 1 + uniform 50%\n", V1) == ["at vit.out keep cls top 1 + uniform 50%"]
    # neighbour counts, pool windows and text pivots are not token counts of the image
    assert _stages("at vit.out keep cls top 25% by outliers then absorb 32\n", V1) == [
        "at vit.out keep cls top 25% by outliers then absorb 32"]
    assert _stages("at vit.out pool 2x2\n", V1) == ["at vit.out pool 2x2"]
    assert _stages("at llm.layer2 keep knorm top 4 + far(norm) 64 with 4 text pivots by knorm\n", V1) == [
        "at llm.layer1 keep knorm top 1 + far(norm) 16 with 4 text pivots by knorm"]


def test_layers_keep_their_relative_depth():
    pdrop = ('at llm.layer2 keep text@llm.layer2 top 112 renumber\nat llm.layer8 keep text@llm.layer8 top 20 renumber\n'
             'at llm.layer16 keep text@llm.layer16 top 4 renumber\n')
    # 16 layers: 2 -> 1, 8 -> 4, 16 -> 8; counts unchanged (576 -> 576)
    assert _stages(pdrop, V2) == ["at llm.layer1 keep text@llm.layer1 top 112 renumber",
                                  "at llm.layer4 keep text@llm.layer4 top 20 renumber",
                                  "at llm.layer8 keep text@llm.layer8 top 4 renumber"]
    # 4 layers: 2 -> 0.25, held at 1 (a cut after some layers stays after one); 8 -> 1; 16 -> 2.
    # Two stages on llm.layer1 run there in order: the total cut stays.
    assert _stages(pdrop, V1) == ["at llm.layer1 keep text@llm.layer1 top 28 renumber",
                                  "at llm.layer1 keep text@llm.layer1 top 5 renumber",
                                  "at llm.layer2 keep text@llm.layer2 top 1 renumber"]
    # negative layers resolve first: -2 of 24 = 22 -> 22 * 5/24 = 4.58 -> 5, held at the last layer 4
    assert _stages("at vit.layer-2 keep cls top 50%\n", V1) == ["at vit.layer4 keep cls top 50%"]
    assert _stages("at vit.layer0 keep cls@vit.layer0 top 50%\n", V1) == ["at vit.layer0 keep cls@vit.layer0 top 50%"]


def test_schedules_unroll_and_scores_stay_before_their_stage():
    # every layer from 1 to 3 on 24 -> 1, 1, 1 (0.2, 0.4, 0.6 on 5 layers, held at >= 1)
    assert _stages("every layer from vit.layer1 to vit.layer3 merge 8\n", V1) == ["at vit.layer1 merge 2"] * 3
    # the score read at vit.layer1 (before the stage at vit.layer2) lands on vit.layer0 of
    # 5 layers: 1 -> 0.2 -> 0, the stage 2 -> 0.4 held at 1; `over 20 layers` scales like a depth
    done = rescale(parse("at vit.layer2 keep cls@vit.layer1 top 64 by entropy(cls) over 20 layers\n"),
                   get_spec(LLAVA), get_spec(V1))
    (stage,) = done.policy.stages
    assert stage.site.index == 1 and stage.action.terms[0].score.at.index == 0
    assert stage.action.terms[0].adaptive.steps == 4  # 20 * 5/24 = 4.17
    check(done.policy, V1)


def test_budgets_tokens_scale_absolute_figures_are_refused():
    done = rescale(parse("budget tokens <= 64\nbudget flops <= 25%\nat vit.out keep cls top 64\n"),
                   get_spec(LLAVA), get_spec(V1))
    assert [(b.metric, b.value) for b in done.policy.budgets] == [("tokens", 16), ("flops", 25)]
    text = 'policy "p"\nbudget flops <= 1000000000\nat vit.out keep cls top 64\n'
    with pytest.raises(PolicyError) as err:
        rescale(parse(text, "p.vt"), get_spec(LLAVA), get_spec(V1), text=text, filename="p.vt")
    assert err.value.format().startswith("p.vt:2:1: error: an absolute 'flops' budget")


def test_portable_refuses_other_models_and_passes_its_own():
    text = 'policy "v"\nmodel "llava-1.5-7b"\nat vit.out keep cls top 64\n'
    policy = parse(text, "v.vt")
    with pytest.raises(PolicyError) as err:
        portable(policy, get_spec(V1), False, text=text, filename="v.vt")
    assert err.value.format().startswith("v.vt:2:1: error: policy was written for model 'llava-1.5-7b' but would "
                                         "run on 'tiny-llava-vtbench'")
    assert "--rescale" in err.value.format()
    assert portable(policy, get_spec(LLAVA), False)[0] is policy
    # an alias names the same model
    alias = parse('model "llava-hf/llava-1.5-7b-hf"\nat vit.out keep cls top 64\n')
    assert portable(alias, get_spec(LLAVA), False)[1] is None
    assert portable(parse("at vit.out keep cls top 64\n"), get_spec(V1), False)[1] is None
    # a model of the same tokens and depths (tiny-llava: 576, 24, 32) runs it as written
    assert portable(policy, get_spec("tiny-llava"), False)[0] is policy
    scaled, info = portable(policy, get_spec(V1), True)
    assert scaled.model == V1 and info.to_json()["token_ratio"] == 0.25 and "64 -> 16 tokens" in info.changes


@pytest.mark.parametrize("target", [V1, V2])
def test_every_zoo_file_rescales_and_checks(target):
    spec = get_spec(target)
    for path in sorted((ROOT / "policies").glob("*.vt")):
        text = path.read_text(encoding="utf-8")
        if 'model "llava-1.5-7b"' not in text:  # the image zoo; video policies name a video model
            continue
        policy, info = portable(parse(text, str(path)), spec, True, text=text, filename=str(path))
        plan = check(policy, spec, source=text, filename=str(path))
        assert info is not None and plan.visual_tokens_to_llm <= spec.image_tokens, path.name


def test_eval_refuses_then_rescales_a_zoo_file():
    zoo = str(ROOT / "policies" / "visionzip-64.vt")
    runner = CliRunner()
    refused = runner.invoke(main, ["eval", zoo, "--n", "2"])
    assert refused.exit_code == 2
    assert "visionzip-64.vt:19:1: error: policy was written for model 'llava-1.5-7b'" in refused.stderr
    done = runner.invoke(main, ["eval", zoo, "--n", "2", "--rescale", "--json"])
    assert done.exit_code == 0, done.output
    row = {r["policy"]: r for r in json.loads(done.stdout)["results"]}["visionzip-64"]
    assert row["visual_tokens_to_llm"] == 1 + 13 + 3  # CLS + dominant + contextual (64 = 1 + 53 + 10 on LLaVA)
    assert row["rescaled"]["from"] == LLAVA and row["rescaled"]["token_ratio"] == 0.25
    table = runner.invoke(main, ["eval", zoo, "--n", "2", "--rescale"])
    assert table.exit_code == 0, table.output
    assert "visionzip-64: rescaled llava-1.5-7b -> tiny-llava-vtbench: counts x 0.25" in table.stdout
    assert "  at vit.out keep cls_token + cls top 13 then add rest into 3 by keys" in table.stdout


def test_search_reference_rows_refuse_or_rescale():
    from vtdsl.search.report import _evaluate_reference, pareto_table

    zoo = ROOT / "policies" / "pdrop-64.vt"
    rows = {}
    for flag in (False, True):
        ctx = SimpleNamespace(spec=get_spec(V2), cfg=SimpleNamespace(rescale=flag, text_tokens=16), budgets=[],
                              space=SimpleNamespace(base_policy=lambda: parse("at vit.out keep cls top 50%\n")),
                              score=lambda plan: {"score": plan.visual_tokens_to_llm / 576})
        rows[flag] = _evaluate_reference(ctx, "pdrop-64", "zoo", zoo.read_text(), str(zoo))
    assert rows[False]["status"] == "invalid" and "written for model 'llava-1.5-7b'" in rows[False]["reason"]
    assert rows[True]["status"] == "ok" and rows[True]["rescaled"]["llm_layers"] == [32, 16]
    assert "| pdrop-64 (rescaled from llava-1.5-7b) |" in pareto_table([], [rows[True]])


def test_search_refuses_a_space_written_for_another_model(tmp_path):
    from vtdsl.search.objectives import SearchError
    from vtdsl.search.run import SearchConfig, search

    space = tmp_path / "s.vts"
    space.write_text('policy "s"\nmodel "llava-1.5-7b"\nat vit.out keep cls top {32, 64}\n')
    with pytest.raises(SearchError) as err:
        search(SearchConfig(space=str(space), model=V1, objective="agreement", trials=1, references=False,
                            out_dir=str(tmp_path / "out")), progress=False)
    assert err.value.message.startswith(f"{space}:2:1: the space was written for model 'llava-1.5-7b' (576 visual "
                                        "tokens, 24/32 layers) but would search 'tiny-llava-vtbench' (144, 5/4)")
