"""Every zoo method is checked here against its authors' code, or its header says that
no code was released (the baselines have no authors)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

from .conftest import POLICIES

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
BASELINES = ("random", "pool")


def test_every_method_has_a_conformance_test_or_says_it_has_no_code():
    methods: dict[str, list[Path]] = {}
    for path in sorted(POLICIES.glob("*.vt")):
        method = "vtc_cls" if path.stem.startswith("vtc-cls") else path.stem.split("-")[0]
        methods.setdefault(method, []).append(path)
    missing = []
    for method, paths in methods.items():
        if method in BASELINES or (HERE / f"test_{method}.py").exists():
            continue
        if not all("No official code was released" in p.read_text().split("\npolicy ")[0] for p in paths):
            missing.append(method)
    assert missing == []
    assert len(methods) >= 17


def _gen_zoo_table():
    spec = importlib.util.spec_from_file_location("gen_zoo_table", ROOT / "scripts" / "gen_zoo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_files_conformance_line_is_what_its_test_asserts():
    """docs/zoo.md's "authors' code" column comes from the `# conformance:` comments: an exact
    (1.0) or floor claim must equal CLAIMS[policy] in the test module it names, whose
    assertions use that number; every CLAIMS entry must be some file's claim."""
    claim_of = _gen_zoo_table().conformance_claim
    claimed = {}
    for path in sorted(POLICIES.glob("*.vt")):
        claim = claim_of(path)
        if claim["kind"] == "baseline":
            assert path.stem.split("-")[0] in BASELINES, path.name
        elif claim["kind"] == "no code released":
            assert "No official code was released" in path.read_text(), path.name
        else:
            module = importlib.import_module(f"{__package__}.{Path(claim['test']).stem}")
            assert module.CLAIMS.get(path.stem) == claim["floor"], (path.name, claim)
            claimed[path.stem] = claim["floor"]
    for test in sorted(HERE.glob("test_*.py")):
        module = importlib.import_module(f"{__package__}.{test.stem}")
        for name, floor in getattr(module, "CLAIMS", {}).items():
            assert claimed.get(name) == floor, (test.name, name)


def _asserts(source: str) -> list[ast.Assert]:
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assert)]


def test_claims_are_what_the_assertions_use():
    """A module claiming a floor asserts against CLAIMS (so the number in the policy is the
    number tested); one claiming exact asserts an equality."""
    for test in sorted(HERE.glob("test_*.py")):
        claims = getattr(importlib.import_module(f"{__package__}.{test.stem}"), "CLAIMS", {})
        asserts = _asserts(test.read_text())
        reads_claims = any(isinstance(n, ast.Name) and n.id == "CLAIMS" for a in asserts for n in ast.walk(a.test))
        equality = any(isinstance(n, ast.Compare) and any(isinstance(op, ast.Eq) for op in n.ops)
                       for a in asserts for n in ast.walk(a.test))
        if any(floor < 1 for floor in claims.values()):
            assert reads_claims, f"{test.name}: no assertion reads CLAIMS"
        if any(floor == 1 for floor in claims.values()):
            assert equality or reads_claims, f"{test.name}: claims exact but asserts no equality"
