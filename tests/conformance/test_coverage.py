"""Every zoo method is checked here against its authors' code, or its header says that
no code was released (the baselines have no authors)."""

from __future__ import annotations

from pathlib import Path

from .conftest import POLICIES

HERE = Path(__file__).parent
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
