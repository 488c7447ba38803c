"""Every bad input is a located PolicyError with readable words, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vtdsl.lang import MAX_SOURCE_BYTES, PolicyError, from_yaml, parse, parse_file
from vtdsl.lang.parser import grammar
from vtdsl.lang.terminals import TERMINAL_WORDS

ERRORS = Path(__file__).parent / "fixtures" / "lang" / "errors"
CASES = sorted(ERRORS.glob("*.vt"))
RAW_NAME = re.compile(r"__ANON|\b_[A-Z]+\b|\$END|\bNAME\b|\bSITE\b|\bNUMBER\b|\bPERCENT\b|Token\(")


def test_error_fixture_set_is_complete():
    names = {p.stem for p in CASES}
    required = {"unknown_scorer", "misspelled_site", "misspelled_keyword", "missing_quantity", "bad_percent",
                "huge_number", "unterminated_string", "junk_characters", "too_deep", "seed_on_non_random",
                "empty_keep"}
    assert required <= names
    for p in CASES:
        assert p.with_suffix(".txt").exists(), p


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_error_fixture_text(path: Path):
    expected = path.with_suffix(".txt").read_text(encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        parse(path.read_text(encoding="utf-8"), filename=path.name)
    assert info.value.format() + "\n" == expected
    assert not RAW_NAME.search(expected), "a raw grammar name leaked into a message"


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_error_fixture_through_parse_file(path: Path):
    with pytest.raises(PolicyError) as info:
        parse_file(path)
    first = info.value.format().splitlines()[0]
    assert first.startswith(f"{path}:") and ": error: " in first


def test_every_terminal_has_english_words():
    names = {t.name for t in grammar().terminals}
    assert names - set(TERMINAL_WORDS) == set()
    assert all(not n.startswith("__") for n in names), "an anonymous terminal: name it in grammar.lark"


def test_diagnostic_fields():
    with pytest.raises(PolicyError) as info:
        parse("at vit.layr16 keep cls top 10", "p.vt")
    (d,) = info.value.diagnostics
    assert (d.span.line, d.span.column, d.span.end_column) == (1, 4, 13)
    assert d.hint == "did you mean 'vit.layer16'?"
    assert d.to_json()["line"] == 1 and d.to_json()["column"] == 4


def test_multiple_errors_are_reported_in_order():
    text = "at vit.layer16 kep cls top 10\nat llm.layer2 keep divers 64\nat llm.layer3 keep text top 150%\n"
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert [d.span.line for d in info.value.diagnostics] == [1, 2, 3]


def test_missing_quantity_at_end_of_input():
    with pytest.raises(PolicyError) as info:
        parse("at llm.layer2 keep diverse", "p.vt")
    assert info.value.format().splitlines()[0] == "p.vt:1:27: error: unexpected end of input"


@pytest.mark.parametrize(
    "text, message",
    [
        ("at llm.layer2 keep cls(all) top 4", "scorer 'cls' takes no arguments"),
        ("at llm.layer2 keep text(last, all) top 4", "scorer 'text' takes at most 1 argument"),
        ("at llm.layer2 keep cls top 4 per crop per crop", "unexpected keyword 'per'"),
        ("at llm.layer2 keep cls top 4 then merge rest", "unexpected end of input"),
        ("at vit.layer99999 drop all", "out of any model's range"),
        ("at vit.layer99999999999999999999999999999999 drop all", "out of any model's range"),
        ("at vit.out pool 65x1", "between 1x1 and 64x64"),
        ("at vit.out pool 99999999999999999999999x2", "between 1x1 and 64x64"),
        ("at llm.layer2 keep diverse 1e999", "is too large"),
        ("at llm.layer2 keep diverse 1e30", "a token count must lie in 0..1000000"),
        ("at llm.layer2 keep diverse 1" + "0" * 5000, "is too large"),
        ("budget flops <= 1" + "0" * 29, "a budget must be at most 1e24"),
        ("policy \"a\"; policy \"b\"", "a second 'policy' line"),
        ('model "x" "y"', "unexpected string"),
        ("at llm.layer2 keep diverse -4", "unexpected character '-'"),
        ("at llm.layer2 keep \u201ccls\u201d top 4", "U+201C"),
        ("at llm.layer2 keep cls top 4\x00", "U+0000"),
        ("at llm.layer2 keep diverse 4 +", "unexpected end of input"),
        ("at llm.layer2 keep mean(cls, ) top 4", "unexpected ')'"),
        ("at", "unexpected end of input"),
        ("vit.layer2 keep diverse 4", "unexpected site 'vit.layer2'"),
        ("at llm.layer2 KEEP diverse 4", "hint: did you mean 'keep'?"),
        ("at llm.layer2 keep CLS top 4", "hint: did you mean 'cls'?"),
        ("at Vit.Layer2 drop all", "hint: did you mean 'vit.layer2'?"),
        ("at llm.layer2 keep cls top 4 per regoin 2x2", "hint: did you mean 'region'?"),
        ("at llm.layer2 keep cls top 4 than merge rest into 4", "hint: did you mean 'then'?"),
        ("at llm.layer2 keep uniqe 4", "hint: did you mean 'unique'?"),
        ("at llm.layer2 keep meen(cls, attn) top 4", "hint: did you mean 'mean'?"),
        ("at llm.layer2 keep cls@vit.layr12 top 4", "hint: did you mean 'vit.layer12'?"),
        ("polcy \"x\"", "hint: did you mean 'policy'?"),
    ],
)
def test_more_errors(text: str, message: str):
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert message in info.value.format()


def test_size_limit():
    big = "# " + "x" * MAX_SOURCE_BYTES
    with pytest.raises(PolicyError, match="too large"):
        parse(big)
    with pytest.raises(PolicyError, match="too large"):
        from_yaml(big)


def test_size_limit_for_files(tmp_path: Path):
    f = tmp_path / "big.vt"
    f.write_bytes(b"#" * (MAX_SOURCE_BYTES + 1))
    with pytest.raises(PolicyError, match="too large"):
        parse_file(f)
    f.write_bytes(b"#" * MAX_SOURCE_BYTES)  # exactly at the limit is fine
    assert parse_file(f).stages == []


def test_binary_and_non_utf8_files(tmp_path: Path):
    f = tmp_path / "junk.vt"
    f.write_bytes(b"at llm.layer2 keep\n diverse \xff\xfe 64\n")
    with pytest.raises(PolicyError) as info:
        parse_file(f)
    d = info.value.diagnostics[0]
    assert "not UTF-8" in d.message and (d.span.line, d.span.column) == (2, 10)
    f.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    with pytest.raises(PolicyError, match="binary"):
        parse_file(f)
    f.write_bytes(bytes(range(256)))
    with pytest.raises(PolicyError):
        parse_file(f)


def test_file_problems(tmp_path: Path):
    with pytest.raises(PolicyError, match="cannot read"):
        parse_file(tmp_path / "missing.vt")
    with pytest.raises(PolicyError, match="cannot read"):
        (tmp_path / "dir.vt").mkdir()
        parse_file(tmp_path / "dir.vt")
    (tmp_path / "p.txt").write_text("at llm.layer2 drop all")
    with pytest.raises(PolicyError, match="extension"):
        parse_file(tmp_path / "p.txt")
    assert parse_file(tmp_path / "p.txt", syntax="vt").stages[0].site.index == 2


def test_deep_nesting_is_refused():
    text = "at llm.layer2 keep " + "mean(" * 80_000 + "cls" + ", cls)" * 80_000 + " top 4"
    with pytest.raises(PolicyError, match="nest too deeply"):
        parse(text)
    ok = "at llm.layer2 keep " + "mean(" * 8 + "cls" + ", cls)" * 8 + " top 4"
    assert parse(ok).stages[0].action.terms[0].score.op == "mean"


def test_deep_yaml_nesting():
    with pytest.raises(PolicyError, match="nests too deeply|invalid YAML"):
        from_yaml("stages: " + "[" * 100_000)


def test_long_junk_line_is_shown_shortened():
    text = "at llm.layer2 keep " + "x" * 5000 + " top 4"
    with pytest.raises(PolicyError) as info:
        parse(text)
    out = info.value.format()
    assert "unknown scorer 'xxxxxxxxxx" in out and max(len(line) for line in out.splitlines()) < 300


def test_lone_surrogate_in_yaml_is_a_located_error():
    # JSON-style escapes admit \ud800, which no UTF-8 output can carry: refused at the value
    with pytest.raises(PolicyError) as info:
        from_yaml('policy: "\\uD800"\n', "p.yaml")
    first = info.value.format().splitlines()[0]
    assert first == "p.yaml:1:9: error: 'policy' holds a lone surrogate escape, which is not a character"
