"""Policy spaces: hole syntax, counting, enumeration, sampling, located errors.

Every expected count below is worked out by hand in its comment; enumerations are
compared with policies generated here by plain loops, never by vtdsl.search itself.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from vtdsl.cli import main
from vtdsl.lang import PolicyError, format_policy, parse
from vtdsl.search import load_space, parse_space

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "search"
ERRORS = sorted(p for p in (FIXTURES / "errors").iterdir() if p.suffix in (".vts", ".yaml"))
ISSUE_EXAMPLE = ("at vit.layer{8..20} keep anchors top {5%,10%,20%} + buffers; "
                 "at llm.layer{2,3,4} keep diverse {32,64,128}")


@pytest.mark.parametrize("source, count", [
    (ISSUE_EXAMPLE, 13 * 3 * 3 * 3),                                   # 8..20 is 13 layers
    ("at vit.layer{8..20 step 4} keep cls top 10%", 4),                # 8 12 16 20
    ("at vit.layer{8..21 step 4} keep cls top 10%", 4),                # 21 is not reached
    ("at vit.layer{-4..-2} keep cls top 10%", 3),                      # -4 -3 -2
    ("at vit.layer{5..5} keep cls top 10%", 1),
    ("at llm.layer2 keep diverse {1..4, 8, 16}", 6),                   # 1 2 3 4 8 16
    ("at llm.layer2 keep text top {5..25 step 5}%", 5),                # 5% .. 25%
    ("at llm.layer2 keep {text top {25%, 50%} | diverse {32, 64, 128}}", 2 + 3),
    ("at llm.layer2 keep attn top 10% {+ buffers | + uniform {4, 8}}?", 1 + 2 + 1),
    ("at? llm.layer{2,3,4} keep diverse {32,64,128}", 3 * 3 + 1),
    ("at? vit.layer{8, 12} keep cls top 10%; at? llm.layer2 drop all", (2 + 1) * (1 + 1)),
    ("every? {1, 2} layers from vit.layer{2..4} to vit.layer-2 merge 8", 2 * 3 + 1),
    ("at llm.layer2 keep text top {25%, 50%} {renumber}?", 2 * 2),
    ("at llm.layer2 keep {mean(text, attn) top 10% | diverse 64}", 2),  # the comma is inside (...)
    ('policy "a{1,2}"  # {3, 4}\nat llm.layer2 keep diverse 64', 1),     # no holes in strings/comments
    ("at llm.layer2 keep diverse 64", 1),
    ("", 1),
])
def test_count_by_hand(source, count):
    space = parse_space(source)
    assert space.count == count
    if count <= 200:
        assert len(list(space.points())) == count


def test_yaml_space_count_and_points():
    space = load_space(FIXTURES / "design.yaml")
    assert space.count == 2 * 2 * (3 * 2 * 2 + 1)  # vit layer, cls %, optional llm stage (layer, term, grid)
    texts = {space.candidate(p).text for p in space.points()}
    assert len(texts) == 52
    assert ('policy "yaml-space"\nbudget flops <= 40%\nat vit.layer12 keep cls top 20% + buffers\n'
            "at llm.layer3 keep diverse 32 per region 3x3\nat llm.layer20 drop all\n") in texts
    assert ('policy "yaml-space"\nbudget flops <= 40%\nat vit.layer8 keep cls top 10% + buffers\n'
            "at llm.layer20 drop all\n") in texts


def test_yaml_schedules_and_renumber_flags():
    src = ("stages:\n"
           "  - at: llm.layer{2, 3}\n"
           "    keep: text top 50%\n"
           '    renumber: "{true, false}"\n'
           "  - every?: 2\n"
           "    from: llm.layer{5..6}\n"
           "    to: llm.layer10\n"
           "    keep: text top 90%\n"
           "    renumber: true\n")
    space = parse_space(src, "s.yaml", "yaml")
    assert space.count == 2 * 2 * (2 + 1)  # layer x flag x (schedule start, or no schedule)
    expected = set()
    for layer, flag, start in itertools.product((2, 3), ("", " renumber"), (None, 5, 6)):
        text = f"at llm.layer{layer} keep text top 50%{flag}\n"
        if start is not None:
            text += f"every 2 layers from llm.layer{start} to llm.layer10 keep text top 90% renumber\n"
        expected.add(text)
    assert {space.candidate(p).text for p in space.points()} == expected
    holes = {h["name"]: h["kind"] for h in space.describe()}
    assert holes["4:16"] == "flag" and holes["5:5"] == "optional stage"
    with pytest.raises(PolicyError) as info:
        parse_space("stages:\n  - at: llm.layer2\n    drop: all\n    renumber: 3\n", "s.yaml", "yaml")
    d = info.value.diagnostics[0]
    assert (d.span.line, d.span.column) == (4, 15) and "'renumber' takes true, false" in d.message
    with pytest.raises(PolicyError, match="needs 'to: <site>'"):
        parse_space("stages:\n  - every: 2\n    from: vit.layer2\n    merge: 8\n", "s.yaml", "yaml")


def test_every_point_enumerates_to_a_distinct_policy():
    src = ('policy "enum"\n'
           "at vit.layer{8..12 step 2} keep cls top {10%, 20%} {+ buffers}?\n"
           "at? llm.layer{2, 3} keep {text top 50% | diverse {16, 32}}\n")
    space = parse_space(src)
    assert space.count == 3 * 2 * 2 * (2 * (1 + 2) + 1)
    expected = set()
    for layer, q, buf in itertools.product((8, 10, 12), ("10%", "20%"), ("", " + buffers")):
        llm = [None] + [f"at llm.layer{l} keep {t}" for l in (2, 3)
                        for t in ("text top 50%", "diverse 16", "diverse 32")]
        for stage in llm:
            expected.add(f'policy "enum"\nat vit.layer{layer} keep cls top {q}{buf}\n' + (f"{stage}\n" if stage else ""))
    got = [space.candidate(p).text for p in space.points()]
    assert len(got) == len(set(got)) == space.count == 84
    assert set(got) == expected
    assert all(space.index(space.point(i)) == i for i in range(space.count))


def test_sampling_yields_valid_canonical_policies():
    space = load_space(ROOT / "examples" / "design.vts")
    assert space.count == 13 * 3 * 2 * (3 * 3 + 1)
    samples = space.sample(25, seed=0)
    assert len({i for i, _ in samples}) == 25
    for index, point in samples:
        assert space.point(index) == point
        text = space.candidate(point).text
        assert format_policy(parse(text)) == text
    assert space.sample(25, seed=0) == samples
    assert space.sample(25, seed=1) != samples
    small = parse_space("at llm.layer{2, 3} keep diverse 8")
    assert sorted(i for i, _ in small.sample(10, seed=0)) == [0, 1]


def test_optuna_suggestions_are_points_with_conditional_parameters():
    space = parse_space("at vit.layer{8..20 step 4} keep cls top {10%, 20%} {+ uniform {4, 8}}?\n"
                        "at? llm.layer2 keep {text top 50% | diverse {16, 32}}")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    nested_seen = set()
    for _ in range(40):
        trial = study.ask()
        point = space.suggest(trial)
        assert trial.params == point
        assert space.point(space.index(point)) == point
        if point["1:52"] is None:
            assert "1:63" not in point  # a nested hole is a parameter only when its item is chosen
        else:
            nested_seen.add(point["1:63"])
        if point["2:1"] is False:
            assert "2:21" not in point and "2:45" not in point
        space.candidate(point)
        study.tell(trial, 0.0)
    assert nested_seen == {"4", "8"}
    assert isinstance(point["1:13"], int)


@pytest.mark.parametrize("path", ERRORS, ids=lambda p: p.name)
def test_error_fixture_text(path: Path):
    expected = path.with_suffix(".txt").read_text(encoding="utf-8")
    syntax = "yaml" if path.suffix == ".yaml" else "vt"
    with pytest.raises(PolicyError) as info:
        parse_space(path.read_text(encoding="utf-8"), path.name, syntax)
    assert info.value.format() + "\n" == expected


def test_error_fixture_set_covers_the_brief():
    names = {p.stem for p in ERRORS}
    assert {"bad_range", "unknown_word", "unclosed_brace", "range_colon_step", "yaml_unknown_word"} <= names
    assert "did you mean 'unique'?" in (FIXTURES / "errors" / "unknown_word.txt").read_text()


def test_several_errors_are_reported_and_located():
    src = "at vit.layer{20..8} keep cls top 10%\nat llm.layer2 keep {diverse, divers} 8\nat llm.layer2 drop all}\n"
    with pytest.raises(PolicyError) as info:
        parse_space(src, "s.vts")
    spots = [(d.span.line, d.span.column) for d in info.value.diagnostics]
    assert spots == [(1, 14), (3, 23)]  # scanner errors first; the language errors need a clean scan
    with pytest.raises(PolicyError) as info:
        parse_space("at llm.layer2 keep {diverse, divers} 8\nat vit.layr{1, 2} keep cls top 1", "s.vts")
    d1, d2 = info.value.diagnostics
    assert (d1.span.line, d1.span.column, d1.hint) == (1, 30, "did you mean 'diverse'?")
    assert (d2.span.line, d2.span.column) == (2, 4)


def test_cli_space_count_sample_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["space", str(ROOT / "examples" / "design.vts"), "--count"])
    assert res.exit_code == 0 and res.output == "780\n"
    res = runner.invoke(main, ["space", str(ROOT / "examples" / "design.vts"), "--sample", "3", "--seed", "2", "--json"])
    assert res.exit_code == 0
    payload = json.loads(res.output)
    assert payload["count"] == 780 and len(payload["samples"]) == 3
    assert len({s["policy"] for s in payload["samples"]}) == 3
    res = runner.invoke(main, ["space", str(ROOT / "examples" / "design.vts"), "--sample", "2"])
    assert res.exit_code == 0 and res.output.count("# sample") == 2 and 'policy "design-search"' in res.output
    res = runner.invoke(main, ["space", str(ROOT / "examples" / "design.vts")])
    assert res.exit_code == 0 and "780 points, 6 holes" in res.output and "5:13" in res.output
    bad = tmp_path / "bad.vts"
    bad.write_text("at vit.layer{8..} keep cls top 10%\n")
    res = runner.invoke(main, ["space", str(bad)])
    assert res.exit_code == 2
    assert f"{bad}:1:14: error: bad range '8..'" in res.output
    res = runner.invoke(main, ["space", "-", "--count"], input="at llm.layer{2,3} keep diverse {8, 16}\n")
    assert res.exit_code == 0 and res.output == "4\n"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.vts")))
def test_example_spaces_load(name):
    space = load_space(ROOT / "examples" / name)
    assert space.count > 1
    for _, point in space.sample(5, seed=0):
        space.candidate(point)


def test_spaces_search_over_recycle_absorb_and_chunks():
    """The stage endings added for SparseVLM, PruMerge and HoloV take holes in both forms."""
    vts = parse_space("at llm.layer3 keep text(all) top 300 then recycle {40, 83} into {5, 9}\n"
                      "at vit.out keep cls top {32, 64} per chunk {8, 16} proportional then absorb {8, 32}")
    assert vts.count == 2 * 2 * 2 * 2 * 2
    yaml_src = ("stages:\n"
                "  - at: vit.out\n"
                "    keep: cls top {32, 64}\n"
                "    per: chunk {8, 16}\n"
                "    absorb: '{8, 32}'\n"
                "  - at: llm.layer3\n"
                "    keep: text(all) top 100\n"
                "    recycle: '{40, 83}'\n"
                "    recycle_into: 9\n")
    space = parse_space(yaml_src, "s.yaml", "yaml")
    texts = {space.candidate(p).text for p in space.points()}
    assert len(texts) == space.count == 2 * 2 * 2 * 2
    assert ("at vit.out keep cls top 64 per chunk 16 then absorb 8\n"
            "at llm.layer3 keep text(all) top 100 then recycle 83 into 9\n") in texts
    with pytest.raises(PolicyError, match="'recycle' needs 'recycle_into'"):
        parse_space("stages:\n  - at: llm.layer3\n    keep: text top 9\n    recycle: 4\n", "s.yaml", "yaml")


def test_spaces_search_over_recycle_cells():
    vts = parse_space("at vit.out keep cls top {32, 64} then recycle rest into {2x2, 1x2} cells")
    assert {vts.candidate(p).text for p in vts.points()} == {
        f"at vit.out keep cls top {k} then recycle rest into {g} cells\n" for k in (32, 64) for g in ("2x2", "1x2")}
    space = parse_space("stages:\n  - at: vit.out\n    keep: cls top 64\n    recycle_cells: '{2x2, 1x2}'\n",
                        "s.yaml", "yaml")
    assert {space.candidate(p).text for p in space.points()} == {
        "at vit.out keep cls top 64 then recycle rest into 2x2 cells\n",
        "at vit.out keep cls top 64 then recycle rest into 1x2 cells\n"}
