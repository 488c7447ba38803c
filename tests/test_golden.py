"""Issue 18, "behaviour unchanged": every policy of policies/ and examples/ on every
registered model gives what it gave before the refactor (commit 324a26a): the
`vtdsl check --json` outcome, the compile listing, and on the three tiny forward models the
kept tokens per stage and a logits checksum.

The goldens (tests/fixtures/golden/<model>.json) were written by scripts/gen_golden.py
run with that commit's code on the policy files of 009804a (their headers gained comment
lines after 324a26a, which moves the line numbers in diagnostics):

    git worktree add /tmp/golden-base 324a26a && git worktree add --detach /tmp/policies 009804a
    PYTHONPATH=/tmp/golden-base .venv/bin/python scripts/gen_golden.py -o tests/fixtures/golden \
        --policies-from /tmp/policies

Re-recorded once with the code of the re-recording commit (scripts/gen_golden.py -o
tests/fixtures/golden) after a review found exactly two intended changes and nothing else:
`check --json` gained the `conventions` key (issue 21: 214 records), and the compile
listing's `<model>.generate` line says "(returned ids: the caller's prompt, then the new
tokens)" since generate() returns the caller's ids (issue 17: 133 records, which also moves
their listing JSON digest).

This test runs the same script's records against the current code. A mismatch is a
behaviour change to explain, not a fixture to regenerate silently: re-record only the
models it concerns (`--model NAME`) and say in the commit what changed and why. A model
registered after the recording has no goldens until someone records them.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
MODELS = sorted(p.stem for p in GOLDEN.glob("*.json"))
FLOAT_RTOL = 1e-9  # analytic costs: only a reordered float sum may move them
LOGITS_RTOL = 1e-5  # a compiled forward: reordered float kernels move the last digits


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_golden", ROOT / "scripts" / "gen_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def differences(golden, now, where: str = "", rtol: float = FLOAT_RTOL) -> list[str]:
    """Every place where `now` departs from `golden`, as 'path: golden -> now'."""
    if "logits" in where.split("."):
        rtol = LOGITS_RTOL
    if isinstance(golden, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(golden) | set(now)):
            if key not in now:
                out.append(f"{where}.{key}: missing now (golden {_short(golden[key])})")
            elif key not in golden:
                out.append(f"{where}.{key}: new (now {_short(now[key])})")
            else:
                out += differences(golden[key], now[key], f"{where}.{key}", rtol)
        return out
    if isinstance(golden, list) and isinstance(now, list) and len(golden) == len(now):
        return [d for i, (g, n) in enumerate(zip(golden, now)) for d in differences(g, n, f"{where}[{i}]", rtol)]
    if isinstance(golden, float) and isinstance(now, (int, float)) and not isinstance(now, bool):
        return [] if math.isclose(golden, now, rel_tol=rtol, abs_tol=rtol) else [f"{where}: {golden!r} -> {now!r}"]
    return [] if golden == now and type(golden) is type(now) else [f"{where}: {_short(golden)} -> {_short(now)}"]


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:200] + "..."


def _pretty_diff(golden, now, name: str) -> str:
    before = json.dumps(golden, indent=1, sort_keys=True).splitlines()
    after = json.dumps(now, indent=1, sort_keys=True).splitlines()
    lines = list(difflib.unified_diff(before, after, f"golden/{name}", f"now/{name}", n=2, lineterm=""))
    return "\n".join(lines[:60] + ([f"... {len(lines) - 60} more diff lines"] if len(lines) > 60 else []))


def test_the_goldens_cover_every_model_and_policy():
    from vtdsl.models import list_specs

    registered = {s.name for s in list_specs()}
    assert MODELS and set(MODELS) <= registered, f"goldens of models no longer registered: {set(MODELS) - registered}"
    # the models the refactor had to leave unchanged must stay covered
    assert {"llava-1.5-7b", "llava-next-7b", "qwen2.5-vl-7b", "tiny-llava", "tiny-llava-vtbench"} <= set(MODELS)
    for model in MODELS:
        golden = json.loads((GOLDEN / f"{model}.json").read_text(encoding="utf-8"))
        missing = [p for p in golden if not (ROOT / p).is_file()]
        assert not missing, f"policies with goldens that no longer exist: {missing}"


def test_the_differ_reports_what_changed():
    golden = {"check": {"exit": 0, "json": {"flops": 1.5, "stages": [1, 2]}}, "forward": {"logits": {"sum": 1.0}}}
    assert differences(golden, golden) == []
    moved = {"check": {"exit": 2, "json": {"flops": 1.5 * (1 + 1e-6), "stages": [1, 3]}},
             "forward": {"logits": {"sum": 1.0 + 1e-7}}}
    assert differences(golden, moved) == [".check.exit: 0 -> 2", f".check.json.flops: 1.5 -> {1.5 * (1 + 1e-6)!r}",
                                          ".check.json.stages[1]: 2 -> 3"]


@pytest.mark.parametrize("model", MODELS)  # ~13 s for all eight on one core: not marked slow
def test_behaviour_unchanged(model):
    golden = json.loads((GOLDEN / f"{model}.json").read_text(encoding="utf-8"))
    with gen.working_directory(ROOT):
        now = gen.model_records(model, list(golden))
    now = json.loads(json.dumps(now))  # tuples -> lists, as in the stored file
    report = []
    for path, expected in golden.items():
        found = differences(expected, now[path])
        if found:
            report.append(f"== {path} on {model}: {len(found)} difference(s)\n  " + "\n  ".join(found[:12])
                          + "\n" + _pretty_diff(expected, now[path], path))
    assert not report, "behaviour changed against the goldens of 324a26a:\n" + "\n".join(report)
