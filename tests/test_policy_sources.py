"""A policy given to the Python API as an AST, a path or source text."""

from __future__ import annotations

from pathlib import Path

import pytest

import vtdsl
import vtdsl.compiler as vc
from vtdsl.lang import PolicyError, parse

ZOO = Path(__file__).resolve().parents[1] / "policies"


@pytest.fixture(scope="module")
def tiny_llava():
    from vtdsl.models import get_spec

    return get_spec("tiny-llava").build(device="cpu")


@pytest.mark.parametrize("missing", ["policies/holov-64.vt", "nowhere/p.yaml", Path("nowhere.vt")])
def test_a_mistyped_path_says_no_such_file(missing, tiny_llava):
    # Before, a missing path was parsed as policy text: "unexpected character '/'".
    for call in (lambda: vtdsl.check(missing, "llava-1.5-7b"), lambda: vc.apply(missing, tiny_llava).__enter__()):
        with pytest.raises(PolicyError) as err:
            call()
        assert "No such file" in str(err.value) and str(missing) in str(err.value)


def test_path_text_and_ast_give_one_plan():
    path = ZOO / "fastv.vt"
    text = path.read_text()
    plans = [vtdsl.check(p, "llava-1.5-7b") for p in (path, str(path), text, parse(text))]
    assert len({repr([(s.tokens_in, s.tokens_out) for s in plan.stages]) for plan in plans}) == 1
