"""`vtdsl parse` and `vtdsl fmt` through click's CliRunner: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vtdsl.cli.lang_cmds import fmt, parse

DESIGN = "at vit.layer16 keep anchors top 10% + buffers; at llm.layer2 keep diverse 64\n"
CANONICAL = "at vit.layer16 keep anchors top 10% + buffers\nat llm.layer2 keep diverse 64\n"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def design(tmp_path: Path) -> Path:
    f = tmp_path / "design.vt"
    f.write_text(DESIGN, encoding="utf-8")
    return f


def test_parse_tree(runner, design):
    r = runner.invoke(parse, [str(design)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "Policy  (1:1)"
    assert "      site: vit.layer16  (1:4)" in lines
    assert "            score: anchors  (1:21)" in lines
    assert "            kind: diverse" in lines


def test_parse_json(runner, design):
    r = runner.invoke(parse, [str(design), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [s["site"] for s in data["stages"]] == [
        {"span": {"line": 1, "column": 4, "end_line": 1, "end_column": 14}, "tower": "vit", "index": 16},
        {"span": {"line": 1, "column": 51, "end_line": 1, "end_column": 60}, "tower": "llm", "index": 2},
    ]
    term = data["stages"][0]["action"]["terms"][0]
    assert (term["kind"], term["score"]["name"], term["qty"]["value"], term["qty"]["percent"]) == ("top", "anchors", 10, True)


def test_parse_stdin(runner):
    r = runner.invoke(parse, ["-", "--json"], input="at llm.layer2 keep diverse 64")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["stages"][0]["action"]["terms"][0]["kind"] == "diverse"
    r = runner.invoke(parse, ["-", "--from", "yaml", "--json"], input="stages: [{at: llm.layer2, merge: 3}]")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["stages"][0]["action"]["pairs"]["value"] == 3


def test_parse_bad_input_exits_2_with_located_error(runner, tmp_path):
    f = tmp_path / "bad.vt"
    f.write_text("at llm.layer2 keep divers 64\n")
    r = runner.invoke(parse, [str(f)])
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{f}:1:20: error: unknown scorer 'divers'",
        "  at llm.layer2 keep divers 64",
        "                     ^^^^^^",
        "  expected: a term: a score with 'top' (cls top 10%), a selector (diverse, uniform, unique, random, far), buffers or cls_token",
        "  hint: did you mean 'diverse'?",
    ]
    assert "Traceback" not in r.output


@pytest.mark.parametrize("content", [b"\xff\xfe\x00junk", b"", b"#" * ((1 << 20) + 1)])
def test_parse_weird_files(runner, tmp_path, content):
    f = tmp_path / "weird.vt"
    f.write_bytes(content)
    r = runner.invoke(parse, [str(f)])
    assert r.exit_code == (0 if content == b"" else 2), r.output
    assert "Traceback" not in r.output


def test_parse_missing_file_and_unknown_extension(runner, tmp_path):
    r = runner.invoke(parse, [str(tmp_path / "nope.vt")])
    assert r.exit_code == 2 and "cannot read policy file" in r.stderr
    (tmp_path / "p.txt").write_text("at llm.layer2 drop all")
    r = runner.invoke(parse, [str(tmp_path / "p.txt")])
    assert r.exit_code == 2 and "extension" in r.stderr
    r = runner.invoke(parse, [str(tmp_path / "p.txt"), "--from", "vt"])
    assert r.exit_code == 0


def test_fmt_prints_canonical(runner, design):
    r = runner.invoke(fmt, [str(design)])
    assert r.exit_code == 0 and r.stdout == CANONICAL


def test_fmt_check(runner, design, tmp_path):
    r = runner.invoke(fmt, ["--check", str(design)])
    assert r.exit_code == 1
    assert "not in canonical form" in r.stderr
    assert "+at llm.layer2 keep diverse 64" in r.stdout  # a diff
    good = tmp_path / "good.vt"
    good.write_text(CANONICAL)
    r = runner.invoke(fmt, ["--check", str(good)])
    assert r.exit_code == 0 and r.output == ""


def test_fmt_check_bad_input_is_2_not_1(runner, tmp_path):
    f = tmp_path / "bad.vt"
    f.write_text("at llm.layer2 keep\n")
    assert runner.invoke(fmt, ["--check", str(f)]).exit_code == 2


def test_fmt_in_place(runner, design):
    r = runner.invoke(fmt, ["--in-place", str(design)])
    assert r.exit_code == 0
    assert design.read_text() == CANONICAL
    assert "reformatted" in r.stderr
    r = runner.invoke(fmt, ["-i", str(design)])  # already canonical: untouched, silent
    assert r.exit_code == 0 and r.output == ""
    assert runner.invoke(fmt, ["--check", str(design)]).exit_code == 0


def test_fmt_in_place_writes_through_a_symlink(runner, design, tmp_path):
    link = tmp_path / "link.vt"
    link.symlink_to(design)
    assert runner.invoke(fmt, ["-i", str(link)]).exit_code == 0
    assert link.is_symlink() and link.resolve() == design.resolve()
    assert design.read_text() == CANONICAL


def test_fmt_keeps_comments(runner, tmp_path):
    f = tmp_path / "c.vt"
    f.write_text("# head\nat llm.layer2   keep diverse 64 # why\n")
    r = runner.invoke(fmt, [str(f)])
    assert r.stdout == "# head\nat llm.layer2 keep diverse 64  # why\n"


def test_fmt_to_yaml_and_back(runner, design, tmp_path):
    r = runner.invoke(fmt, ["--to", "yaml", str(design)])
    assert r.exit_code == 0
    y = tmp_path / "design.yaml"
    y.write_text(r.stdout)
    r2 = runner.invoke(fmt, ["--to", "vt", str(y)])
    assert r2.exit_code == 0 and r2.stdout == CANONICAL
    assert runner.invoke(fmt, ["--check", str(y)]).exit_code == 0


def test_fmt_usage_errors(runner, design):
    assert runner.invoke(fmt, ["--check", "--in-place", str(design)]).exit_code == 2
    assert runner.invoke(fmt, ["--in-place", "-"], input="at vit.out pool 2x2").exit_code == 2
    assert runner.invoke(fmt, ["--in-place", "--to", "yaml", str(design)]).exit_code == 2
    assert design.read_text() == DESIGN  # nothing was written


def test_fmt_many_files(runner, design, tmp_path):
    good = tmp_path / "good.vt"
    good.write_text(CANONICAL)
    r = runner.invoke(fmt, ["--check", str(good), str(design)])
    assert r.exit_code == 1 and f"{design}: not in canonical form" in r.stderr and str(good) not in r.stderr
    assert runner.invoke(fmt, [str(good), str(design)]).exit_code == 2  # printing takes one file
    bad = tmp_path / "bad.vt"
    bad.write_text("at llm.layer2 keep\n")
    r = runner.invoke(fmt, ["-i", str(design), str(bad)])
    assert r.exit_code == 2 and "bad.vt:1:" in r.output
    assert design.read_text() == DESIGN  # a bad file leaves the others untouched too
    r = runner.invoke(fmt, ["-i", str(design), str(good)])
    assert r.exit_code == 0 and design.read_text() == CANONICAL and r.stderr.count("reformatted") == 1


def test_fmt_stdin(runner):
    r = runner.invoke(fmt, ["-"], input="at  vit.out  pool 2x2;at llm.layer2 drop all")
    assert r.exit_code == 0 and r.stdout == "at vit.out pool 2x2\nat llm.layer2 drop all\n"
    r = runner.invoke(fmt, ["--check", "-"], input="at vit.out pool 2x2\n")
    assert r.exit_code == 0


@pytest.mark.parametrize("command", [parse, fmt])
def test_help_has_an_example(runner, command):
    r = runner.invoke(command, ["--help"])
    assert r.exit_code == 0
    assert "Example" in r.stdout and "vtdsl " + command.name in r.stdout


def test_registered_in_main_group(runner):
    from vtdsl.cli import main

    r = runner.invoke(main, ["parse", "-", "--json"], input="at vit.out pool 2x2")
    assert r.exit_code == 0 and json.loads(r.stdout)["stages"][0]["action"]["rows"] == 2


def test_cli_does_not_import_torch():
    code = ("import sys; from vtdsl.cli import lang_cmds; from vtdsl.lang import parse; "
            "parse('at llm.layer2 keep diverse 64'); "
            "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
