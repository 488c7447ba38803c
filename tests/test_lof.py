"""`by lof(K)` / `by lof(K, rest)`: Recoverable Compression's adaptive count.

The reference is the conformance tests' plain-Python transcription of the Local Outlier
Factor as scikit-learn defines it (`conformance.plain.lof_outliers`: k-distance,
reachability distance, local reachability density with its 1e-10, LOF the mean lrd ratio,
contamination "auto" = outlier when LOF > 1.5), written from the definition, not from
vtdsl.ops. When scikit-learn is importable the op is compared with it as well.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from vtdsl import ops
from vtdsl.ir import check
from vtdsl.lang import PolicyError, parse
from vtdsl.lang.format import format_policy

from conformance.plain import lof_outliers as plain_lof_outliers

HEAD = 'policy "x"\nmodel "tiny-llava"\n'


def _samples():
    """(name, float32 values, K): continuous scores like attention (peaked, heavy-tailed),
    RC's masked score (a tenth of the tokens set to the minimum: exact duplicates), a row
    shorter than K, and a constant row (every distance 0)."""
    g = torch.Generator().manual_seed(7)
    att = torch.softmax(torch.randn(576, generator=g) * 3, 0)
    masked = torch.rand(576, generator=g)
    masked[torch.randperm(576, generator=g)[:60]] = masked.min()
    return [("attention", att, 20), ("attention-k10", att, 10), ("masked-min", masked, 20),
            ("heavy", torch.rand(300, generator=g) ** 6, 10), ("short", torch.rand(7, generator=g), 20),
            ("constant", torch.full((40,), 0.25), 10)]


@pytest.mark.parametrize("name,values,k", _samples(), ids=[s[0] for s in _samples()])
def test_lof_outliers_match_the_definition(name, values, k):
    want = plain_lof_outliers([float(v) for v in values.double()], k)
    assert int(ops.lof_outliers(values[None], k)[0]) == want
    if name in ("attention", "masked-min", "heavy"):
        assert want > 0  # the sample exercises the rule


@pytest.mark.parametrize("name,values,k", _samples(), ids=[s[0] for s in _samples()])
def test_lof_outliers_match_scikit_learn(name, values, k):
    from sklearn.neighbors import LocalOutlierFactor as lof  # a dev dependency: never skipped
    with warnings.catch_warnings():  # sklearn warns on duplicates and on K >= n, as it should
        warnings.simplefilter("ignore")
        pred = lof(n_neighbors=k, contamination="auto").fit_predict([[float(v)] for v in values.numpy()])
    assert int(ops.lof_outliers(values[None], k)[0]) == int((pred == -1).sum())


def test_lof_count_masks_the_kept_and_takes_a_share_of_what_is_left():
    g = torch.Generator().manual_seed(3)
    scores = torch.softmax(torch.randn(2, 576, generator=g) * 3, 1)
    kept = torch.zeros(2, 576, dtype=torch.bool)
    kept[0, :40], kept[1, 100:140] = True, True
    want = []
    for row in range(2):
        values = [float(v) for v in scores[row].double()]
        low = min(values)
        masked = [low if kept[row, i] else v for i, v in enumerate(values)]
        want.append(int(536 * (plain_lof_outliers(masked, 20) / 576)))
    assert ops.lof_count(scores, kept, 20, False, 576) == max(want)
    assert ops.lof_count(scores, kept, 20, False, 3) == min(max(want), 3)  # the bound

    rest = [int(40 * (plain_lof_outliers([float(v) for v, k in zip(scores[r].double(), kept[r]) if not k], 10)
                      / 536)) for r in range(2)]
    assert ops.lof_count(scores, kept, 10, True, 576) == max(rest)


def test_lof_count_first_term_is_the_outlier_count_with_rcs_float_rounding():
    values = torch.softmax(torch.randn(1, 576, generator=torch.Generator().manual_seed(5)) * 3, 1)
    c = plain_lof_outliers([float(v) for v in values[0].double()], 20)
    got = ops.lof_count(values, torch.zeros(1, 576, dtype=torch.bool), 20, False, 576)
    assert got == int(576 * (c / 576)) and abs(got - c) <= 1
    # int(n * (c / n)) is c - 1 for some c: RC's numpy ratio, kept as it is
    assert int(49 * (1 / 49)) == 0 and math.isclose(49 * (1 / 49), 1.0)


def test_parse_format_round_trip():
    text = HEAD + "at vit.out keep cls top 15% by lof(20) + cls@vit.layer23 top 10% by lof(10, rest) then absorb 32\n"
    policy = parse(text)
    rules = [t.adaptive for t in policy.stages[0].action.terms]
    assert [(r.kind, r.neighbours, r.of_rest) for r in rules] == [("lof", 20, False), ("lof", 10, True)]
    assert format_policy(policy) == text


@pytest.mark.parametrize("line,needle,column", [
    ("at vit.out keep cls top 15% by lof(0)", "whole number of neighbours", 36),
    ("at vit.out keep cls top 15% by lof(2.5)", "whole number of neighbours", 36),
    ("at vit.out keep cls top 15% by lof(20, kept)", "unexpected", 40),
])
def test_parse_errors_are_located(line, needle, column):
    with pytest.raises(PolicyError) as e:
        parse(HEAD + line + "\n")
    d = e.value.diagnostics[0]
    assert needle in d.message and (d.span.line, d.span.column) == (3, column)


@pytest.mark.parametrize("line,needle", [
    ("at vit.out keep diverse 16 + cls top 15% by lof(20)", "only 'top' terms tell"),
    ("at vit.out keep cls top 15% by lof(10, rest)", "none are"),
])
def test_check_errors(line, needle):
    with pytest.raises(PolicyError) as e:
        check(line, "tiny-llava")
    assert needle in str(e.value) and "by lof" in str(e.value)
