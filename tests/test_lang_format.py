"""Canonical formatting (`fmt`) and the YAML form."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vtdsl.lang import PolicyError, format_policy, format_source, from_yaml, parse, parse_file, to_yaml
from vtdsl.lang import ast as A

FIXTURES = Path(__file__).parent / "fixtures" / "lang"
VALID = sorted(FIXTURES.glob("*.vt"))


def test_canonical_text_of_messy_input():
    messy = ('budget   flops<=25%;model "llava-1.5-7b"\n'
             '  at  vit.layer16   keep anchors  top 10.0%+buffers ;at llm.layer2 keep '
             'mean( cls@vit.layer12 ,cls @ vit.layer016 )top 64 per  region 2x2 then merge rest into 16.0\n'
             'policy "p"\n')
    assert format_policy(parse(messy)) == (
        'policy "p"\n'
        'model "llava-1.5-7b"\n'
        "budget flops <= 25%\n"
        "at vit.layer16 keep anchors top 10% + buffers\n"
        "at llm.layer2 keep mean(cls@vit.layer12, cls@vit.layer16) top 64 per region 2x2 then merge rest into 16\n"
    )


def test_number_printing():
    p = A.Policy(budgets=[A.Budget(metric="flops", op="<", value=1e-7, percent=True),
                          A.Budget(metric="flops", op="<", value=2.5e12),
                          A.Budget(metric="kv", op="<=", value=33.333333333333336, percent=True)])
    assert format_policy(p) == ("budget flops < 0.0000001%\nbudget flops < 2500000000000\n"
                                "budget kv <= 33.333333333333336%\n")
    assert parse(format_policy(p)) == p


@pytest.mark.parametrize("written, printed", [("1e30", "1e+30"), ("1E+29", "1e+29"), ("123.5e40", "1.235e+42"),
                                              ("1e15", "1000000000000000")])
def test_huge_weights_print_so_they_parse_back(written: str, printed: str):
    # Integer digits of a float past 2**53 are noise: 1e30 printed positionally has 31 digits,
    # more than the parser reads, so fmt | fmt failed.
    policy = parse(f"at vit.out keep sum(cls, {written} * attn) top 5")
    text = format_policy(policy)
    assert text == f"at vit.out keep sum(cls, {printed} * attn) top 5\n"
    assert parse(text) == policy and format_policy(parse(text)) == text
    assert from_yaml(to_yaml(policy)) == policy


def test_strings_are_escaped():
    p = A.Policy(name='a "q" \\ b\nc\t\x00 \u00e9 \U0001f600 \u2028', model="")
    text = format_policy(p)
    assert text.count("\n") == 2  # still one line per statement
    assert text.splitlines()[0] == r'policy "a \"q\" \\ b\nc\t\u0000 é 😀 \u2028"'
    assert parse(text) == p


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_format_source_is_idempotent_and_preserves_meaning(path: Path):
    text = path.read_text(encoding="utf-8")
    once = format_source(text)
    assert format_source(once) == once
    assert parse(once) == parse(text)


def test_format_source_keeps_comments_and_paragraphs():
    text = (
        "# Policy: design\n"
        "at vit.layer16 keep anchors top 10% + buffers   # ViT stage   \n"
        "\n\n\n"
        "# LLM stage\n"
        "at llm.layer2 keep diverse 64; at llm.layer8 drop all # two on a line\n"
        "policy \"design\"\n"
        "# trailing remark\n"
    )
    assert format_source(text) == (
        'policy "design"\n'
        "# Policy: design\n"
        "at vit.layer16 keep anchors top 10% + buffers  # ViT stage\n"
        "\n"
        "# LLM stage\n"
        "at llm.layer2 keep diverse 64\n"
        "at llm.layer8 drop all  # two on a line\n"
        "# trailing remark\n"
    )


def test_format_source_comment_only_and_empty():
    assert format_source("") == ""
    assert format_source("\n\n# hello  \n\n\n# world\n") == "# hello\n\n# world\n"


# ---- YAML ---------------------------------------------------------------------------


DESIGN_YAML = """\
policy: design
model: llava-1.5-7b
budget:
  - flops <= 25%
  - tokens <= 64
stages:
  - at: vit.layer16
    keep:
      - anchors top 10%
      - buffers
  - at: llm.layer2
    keep:
      - diverse 64
    per: region 2x2
    merge_rest_into: 16
  - at: llm.layer8
    merge: 10%
  - at: vit.out
    pool: 2x2
  - at: llm.layer20
    drop: all
"""

DESIGN_VT = """\
policy "design"
model "llava-1.5-7b"
budget flops <= 25%
budget tokens <= 64
at vit.layer16 keep anchors top 10% + buffers
at llm.layer2 keep diverse 64 per region 2x2 then merge rest into 16
at llm.layer8 merge 10%
at vit.out pool 2x2
at llm.layer20 drop all
"""


def test_yaml_and_vt_give_the_same_ast():
    assert from_yaml(DESIGN_YAML) == parse(DESIGN_VT)
    assert to_yaml(parse(DESIGN_VT)) == DESIGN_YAML
    assert format_policy(from_yaml(DESIGN_YAML)) == DESIGN_VT


def test_yaml_accepts_compact_forms():
    text = "budget: flops <= 25%\nstages:\n  - {at: vit.layer16, keep: anchors top 10% + buffers}\n  - {at: llm.layer2, merge: 32}\n"
    assert from_yaml(text) == parse("budget flops <= 25%\nat vit.layer16 keep anchors top 10% + buffers\nat llm.layer2 merge 32")


def test_yaml_is_plain_data_for_safe_load():
    data = yaml.safe_load(to_yaml(parse(DESIGN_VT)))
    assert data["stages"][0] == {"at": "vit.layer16", "keep": ["anchors top 10%", "buffers"]}
    assert data["stages"][1]["merge_rest_into"] == 16


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_yaml_round_trip_fixtures(path: Path):
    policy = parse_file(path)
    assert from_yaml(to_yaml(policy)) == policy


def test_yaml_files_dispatch_on_extension(tmp_path: Path):
    for ext in (".yaml", ".yml"):
        f = tmp_path / f"p{ext}"
        f.write_text(DESIGN_YAML, encoding="utf-8")
        assert parse_file(f) == parse(DESIGN_VT)


def test_yaml_empty_document_is_the_empty_policy():
    assert from_yaml("") == A.Policy()
    assert from_yaml("# nothing\n") == A.Policy()
    assert from_yaml(to_yaml(A.Policy())) == A.Policy()


@pytest.mark.parametrize(
    "text, where, message",
    [
        ("stages:\n  - at: vit.layr16\n    keep: [diverse 4]\n", (2, 9), "unknown site 'vit.layr16'"),
        ("stages:\n  - at: vit.layer3\n    keep: [cls top 4, divers 4]\n", (3, 23), "unknown scorer 'divers'"),
        ("stages:\n  - at: vit.layer3\n    keep: 'cls top 150%'\n", (3, 20), "a percentage must lie in 0..100"),
        ("stages:\n  - at: vit.layer3\n    keep: \"cls top 150%\"\n", (3, 20), "a percentage must lie in 0..100"),
        ("budgets: [flops <= 3]\n", (1, 1), "unknown key 'budgets'"),
        ("budget: [flops >= 3]\n", (1, 16), "unexpected character '>'"),
        ("stages:\n  - at: llm.layer2\n    merge: 3\n    pool: 2x2\n", (4, 5), "a stage has one action"),
        ("stages:\n  - at: llm.layer2\n", (2, 5), "a stage needs an action"),
        ("stages:\n  - keep: [diverse 4]\n", (2, 5), "a stage needs 'at: <site>'"),
        ("stages:\n  - at: llm.layer2\n    merge: 3\n    per: crop\n", (4, 5), "'per' belongs to 'keep'"),
        ("stages:\n  - at: llm.layer2\n    keep: []\n", (3, 11), "'keep' needs at least one term"),
        ("stages:\n  - at: llm.layer2\n    drop: yes\n", (3, 11), "'drop' takes the value 'all'"),
        ("stages:\n  - at: llm.layer2\n    merge: 12.5\n", (3, 12), "a token count must be a whole number"),
        ("stages:\n  - at: llm.layer2\n    keep: diverse 4 seed 2\n", (3, 21), "'seed' belongs to 'random'"),
        ("stages:\n  - at: llm.layer2\n    keep: [diverse 4; uniform 2]\n", (3, 21), "in a value"),
        ("stages: {at: llm.layer2}\n", (1, 9), "'stages' must be a list"),
        ("policy: [a]\n", (1, 9), "'policy' must be a string"),
        ("model:\n", (1, 7), "'model' must be a string"),
        ("policy: a\npolicy: b\n", (2, 1), "duplicate key 'policy'"),
        ("stages: &s [*s]\n", (1, 9), "aliases are not supported"),
        ("- at: llm.layer2\n", (1, 1), "a YAML policy must be a mapping"),
        ("policy: [\n", (2, 1), "invalid YAML"),
        ("policy: a\n---\npolicy: b\n", (2, 1), "invalid YAML"),
        ("policy: \"\x07\"\n", (1, 10), "invalid YAML"),
    ],
)
def test_yaml_errors_are_located(text: str, where: tuple[int, int], message: str):
    with pytest.raises(PolicyError) as info:
        from_yaml(text, "p.yaml")
    d = info.value.diagnostics[0]
    assert message in d.message, info.value.format()
    assert (d.span.line, d.span.column) == where, info.value.format()
    assert info.value.format().startswith(f"p.yaml:{where[0]}:{where[1]}: error: ")


def test_yaml_error_shows_the_yaml_line():
    with pytest.raises(PolicyError) as info:
        from_yaml("stages:\n  - at: vit.layer3\n    keep: [divers 4]\n", "p.yaml")
    assert info.value.format() == (
        "p.yaml:3:12: error: unknown scorer 'divers'\n"
        "      keep: [divers 4]\n"
        "             ^^^^^^\n"
        "  expected: a term: a score with 'top' (cls top 10%), a selector (diverse, uniform, unique, random, far), buffers or cls_token\n"
        "  hint: did you mean 'diverse'?"
    )
