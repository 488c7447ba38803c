"""Parsing `.vt` text into the AST: fixtures, the design example, spans, numbers."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from vtdsl.lang import PolicyError, format_policy, parse, parse_file
from vtdsl.lang import ast as A

FIXTURES = Path(__file__).parent / "fixtures" / "lang"
VALID = sorted(FIXTURES.glob("*.vt"))


def without_spans(x):
    if isinstance(x, dict):
        return {k: without_spans(v) for k, v in x.items() if k != "span"}
    if isinstance(x, list):
        return [without_spans(v) for v in x]
    return x


def test_fixture_set_is_complete():
    names = {p.stem for p in VALID}
    assert {"design", "headers", "sites", "terms", "scores", "keep_options", "actions", "quantities",
            "separators", "empty", "keywords"} <= names
    for p in VALID:
        assert p.with_suffix(".json").exists(), p


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_fixture_parses_to_expected_ast(path: Path):
    expected = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    policy = parse_file(path)
    assert without_spans(policy.model_dump(mode="json")) == expected
    # The JSON form is itself a valid AST equal to the parsed one.
    assert A.Policy.model_validate(expected) == policy


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_fixture_format_round_trip(path: Path):
    policy = parse_file(path)
    text = format_policy(policy)
    assert parse(text) == policy
    assert format_policy(parse(text)) == text


def test_design_example_verbatim():
    p = parse("at vit.layer16 keep anchors top 10% + buffers; at llm.layer2 keep diverse 64")
    assert p.name is None and p.model is None and p.budgets == []
    assert len(p.stages) == 2
    s1, s2 = p.stages
    assert (s1.site.tower, s1.site.index) == ("vit", 16)
    assert isinstance(s1.action, A.Keep)
    top, buf = s1.action.terms
    assert isinstance(top, A.TopTerm) and top.score == A.ScoreRef(name="anchors")
    assert (top.qty.value, top.qty.percent) == (10, True)
    assert isinstance(buf, A.BuffersTerm) and buf.qty is None
    assert s1.action.region is None and s1.action.rest is None
    assert (s2.site.tower, s2.site.index) == ("llm", 2)
    (div,) = s2.action.terms
    assert isinstance(div, A.SelectTerm) and div.kind == "diverse" and div.seed is None
    assert (div.qty.value, div.qty.percent) == (64, False)


def test_design_example_spans():
    line = "at vit.layer16 keep anchors top 10% + buffers; at llm.layer2 keep diverse 64"
    p = parse(line)
    s1, s2 = p.stages

    def cols(node):
        s = node.span
        return (s.line, s.column, s.end_line, s.end_column)

    # Columns are 1-based and end-inclusive; counted by hand from the line above.
    assert cols(s1) == (1, 1, 1, 45)
    assert cols(s1.site) == (1, 4, 1, 14)
    assert cols(s1.action) == (1, 16, 1, 45)
    assert cols(s1.action.terms[0]) == (1, 21, 1, 35)
    assert cols(s1.action.terms[0].score) == (1, 21, 1, 27)
    assert cols(s1.action.terms[0].qty) == (1, 33, 1, 35)
    assert cols(s1.action.terms[1]) == (1, 39, 1, 45)
    assert cols(s2) == (1, 48, 1, 76)
    assert cols(s2.site) == (1, 51, 1, 60)
    assert cols(s2.action.terms[0].qty) == (1, 75, 1, 76)
    assert line[47:76] == "at llm.layer2 keep diverse 64"


def test_every_node_has_a_span():
    p = parse_file(FIXTURES / "scores.vt")

    def walk(node):
        assert node.span is not None, node
        for _, value in node:
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, A.Node):
                    walk(v)

    walk(p)


def test_spans_do_not_affect_equality():
    a = parse("at llm.layer2 keep diverse 64")
    b = parse("\n\n   at   llm.layer2   keep diverse   64  # moved")
    assert a == b
    assert a.stages[0].span != None  # noqa: E711  (a span never equals "no span")
    built = A.Policy(stages=[A.Stage(site=A.Site(tower="llm", index=2),
                                     action=A.Keep(terms=[A.SelectTerm(kind="diverse", qty=A.Quantity(value=64))]))])
    assert built == a


def test_stage_spans_on_later_lines():
    p = parse("policy \"x\"\n\n  at vit.out pool 2x2\n")
    assert (p.stages[0].span.line, p.stages[0].span.column) == (3, 3)


def test_empty_policy_is_legal():
    for text in ["", "\n\n", "# only a comment\n", " ; ;\n;"]:
        p = parse(text)
        assert p == A.Policy() and p.stages == []
    assert format_policy(A.Policy()) == ""


def test_headers_in_any_order_keep_budget_order():
    p = parse('budget kv <= 30%\nat llm.layer2 drop all\nmodel "m"\nbudget flops < 2\npolicy "n"')
    assert (p.name, p.model) == ("n", "m")
    assert [(b.metric, b.op, b.value, b.percent) for b in p.budgets] == [("kv", "<=", 30, True), ("flops", "<", 2, False)]
    assert format_policy(p) == 'policy "n"\nmodel "m"\nbudget kv <= 30%\nbudget flops < 2\nat llm.layer2 drop all\n'


def test_crlf_bom_tabs():
    p = parse("\ufeffpolicy \"w\"\r\n\tat\tllm.layer2\tkeep diverse 64\r\n")
    assert p.name == "w" and p.stages[0].action.terms[0].qty.value == 64
    assert p.stages[0].span.line == 2


def test_negative_and_zero_padded_layers():
    p = parse("at vit.layer-2 drop all; at vit.layer-0 drop all; at llm.layer007 drop all")
    assert [s.site.index for s in p.stages] == [-2, 0, 7]
    assert format_policy(p).splitlines() == ["at vit.layer-2 drop all", "at vit.layer0 drop all", "at llm.layer7 drop all"]


def test_numbers_are_normalised():
    p = parse("at llm.layer2 keep diverse 64.0 + uniform 1e2 + unique 10.0% + random 12.50%")
    qs = [t.qty for t in p.stages[0].action.terms]
    assert [(q.value, type(q.value), q.percent) for q in qs] == [
        (64, int, False), (100, int, False), (10, int, True), (12.5, float, True)]
    assert format_policy(p) == "at llm.layer2 keep diverse 64 + uniform 100 + unique 10% + random 12.5%\n"


def test_seed_values():
    p = parse("at llm.layer2 keep random 4 seed 9223372036854775807")
    assert p.stages[0].action.terms[0].seed == 2**63 - 1
    with pytest.raises(PolicyError, match="seed must lie in 0..2\\^63-1"):
        parse("at llm.layer2 keep random 4 seed 9223372036854775808")
    with pytest.raises(PolicyError, match="seed must be a whole number"):
        parse("at llm.layer2 keep random 4 seed 1.5")


def test_budget_values():
    p = parse("budget flops <= 3.2e12; budget tokens < 64; budget kv <= 12.5%")
    assert [(b.value, b.percent) for b in p.budgets] == [(3.2e12, False), (64, False), (12.5, True)]
    assert format_policy(p) == "budget flops <= 3200000000000\nbudget tokens < 64\nbudget kv <= 12.5%\n"
    with pytest.raises(PolicyError, match="percentage must lie in 0..100"):
        parse("budget flops <= 101%")


def test_percent_of_tokens_rounds_half_up_exactly():
    def q(text):
        return parse(f"at llm.layer2 keep diverse {text}").stages[0].action.terms[0].qty

    # floor(n*p/100 + 1/2), worked by hand:
    assert q("10%").of(576) == 58  # 57.6 -> 58
    assert q("50%").of(5) == 3  # 2.5 -> 3 (half up, not to even)
    assert q("50%").of(7) == 4  # 3.5 -> 4
    assert q("12.5%").of(3) == 0  # 0.375 -> 0
    assert q("12.5%").of(4) == 1  # 0.5 -> 1
    assert q("0.1%").of(500) == 1  # 0.5 exactly (0.1 read as 1/10, not a binary float)
    assert q("0.1%").of(499) == 0  # 0.499
    assert q("33.3%").of(1500) == 500  # 499.5 -> 500
    assert q("100%").of(576) == 576 and q("0%").of(576) == 0
    assert q("64").of(10) == 64  # counts are not capped here
    assert q("0.1%").fraction() == Fraction(1, 10)


def test_scorer_table_drives_the_parser():
    from vtdsl.lang import SCORERS

    for name, info in SCORERS.items():
        p = parse(f"at llm.layer2 keep {name} top 1")
        assert p.stages[0].action.terms[0].score.name == name
        for arg in info.args:
            p = parse(f"at llm.layer2 keep {name}({arg}) top 1")
            assert p.stages[0].action.terms[0].score.args == [arg]
    assert SCORERS["text"].queries_for(()) == "last_text"
    assert SCORERS["text"].queries_for(("last4",)) == "last4_text"
    assert SCORERS["text"].queries_for(["all"]) == "all_text"
    assert SCORERS["anchors"].canonical == "attn"


def test_keywords_do_not_break_identifiers():
    # "attn" starts with the keyword "at"; "topk" with "top"; "allx" with "all".
    assert parse("at llm.layer2 keep attn top 1").stages[0].action.terms[0].score.name == "attn"
    with pytest.raises(PolicyError, match="unknown scorer 'topk'"):
        parse("at llm.layer2 keep topk 1")
    with pytest.raises(PolicyError, match="unexpected word 'allx'"):
        parse("at llm.layer2 drop allx")
    with pytest.raises(PolicyError, match="unexpected word 'keeps'"):
        parse("at llm.layer2 keeps diverse 4")


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.vt"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_examples_parse_and_format(path: Path):
    from vtdsl.lang import format_source

    text = path.read_text(encoding="utf-8")
    policy = parse_file(path)
    assert policy.stages
    if path.stem != "design":  # design.vt keeps the one-line form of the design document
        assert format_source(text) == text, f"{path} is not in canonical form"


def test_docs_examples_parse():
    import re

    from vtdsl.lang import from_yaml

    doc = (Path(__file__).parent.parent / "docs" / "language.md").read_text(encoding="utf-8")
    vt_blocks = re.findall(r"```vt\n(.*?)```", doc, re.S)
    yaml_blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(vt_blocks) >= 2 and yaml_blocks
    policies = [parse(b) for b in vt_blocks]
    assert policies[1].stages == policies[0].stages
    yaml_stages = from_yaml(yaml_blocks[0]).stages
    assert len(yaml_stages) == 6 and yaml_stages[-1].repeat.step == 2


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_whole_file_start_rule_accepts_fixtures(path: Path):
    """grammar.lark's `start` rule (the documented whole-file grammar) agrees with the
    statement-by-statement front end on every valid fixture."""
    from vtdsl.lang.parser import grammar

    tree = grammar().parse(path.read_text(encoding="utf-8"), start="start")
    p = parse_file(path)
    n_statements = (p.name is not None) + (p.model is not None) + len(p.budgets) + len(p.stages)
    assert len(tree.children) == n_statements
