"""vtbench calibration (issue 22 item 7): statistics against scipy, the zoo's budget runs,
and a small end-to-end report whose accuracies equal `vtdsl eval --rescale`'s."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import rankdata, spearmanr

from vtdsl.eval import calibration as cal

ROOT = Path(__file__).resolve().parent.parent


def test_ranks_and_spearman_match_scipy_with_ties_and_batches():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.integers(0, 4, size=9).astype(float)  # many ties
        b = rng.normal(size=9)
        assert np.allclose(cal.average_ranks(a), rankdata(a))
        assert cal.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    batch = rng.normal(size=(5, 8))
    ref = rng.normal(size=8)
    got = cal.spearman(batch, np.broadcast_to(ref, batch.shape))
    assert np.allclose(got, [spearmanr(row, ref).statistic for row in batch])
    assert np.isnan(cal.spearman(np.ones(5), np.arange(5.0)))  # a constant side has no rank order


def test_zoo_runs_cover_every_published_method_at_every_budget():
    runs = cal.zoo_runs(ROOT / "policies")
    have = {(r.method, r.budget) for r in runs}
    for method, budgets in cal.PUBLISHED.items():
        for budget in budgets:
            assert (method, budget) in have, (method, budget)
    labels = {r.label: r for r in runs}
    # the unsuffixed files sit at their papers' budgets; FastV and PruMerge get count variants
    assert labels["visionzip"].path == "policies/visionzip.vt"  # as the repository names it, not this checkout
    assert labels["visionzip"].budget == 192 and labels["dart"].budget == 128 and labels["holov"].budget == 64
    assert "keep text top 64" in labels["fastv-64*"].source and 'policy "fastv-64"' in labels["fastv-64*"].source
    assert "top 128 then absorb 32" in labels["prumerge-128*"].source
    assert labels["fastv"].budget is None and labels["prumerge"].budget is None  # their own settings too
    assert not any(r.method in ("recoverable", "evs") for r in runs)


def test_retention_and_bootstrap_by_hand():
    correct = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=bool)
    base = np.array([1, 1, 1, 0], dtype=bool)
    idx = np.array([[0, 1, 2, 3], [0, 0, 3, 3]])
    point, boot = cal.retention_table(correct, base, idx)
    assert point.tolist() == [pytest.approx(0.75 / 0.75), pytest.approx(0.25 / 0.75)]
    # resample 2 draws examples 0, 0, 3, 3: run 0 right on 0 and 3 (1.0), base right on 0 only (0.5)
    assert boot[0].tolist() == [pytest.approx(1.0), pytest.approx(1.0 / 0.5)]
    assert boot[1].tolist() == [pytest.approx(1 / 3), pytest.approx(0.0)]


def test_correlations_follow_the_published_order():
    runs = [cal.Run(m, 64, m, "", "") for m in ("fastv", "pdrop", "visionzip", "holov")]
    published = np.array([cal.PUBLISHED[m][64] for m in ("fastv", "pdrop", "visionzip", "holov")])
    point = published / 100
    boot = np.repeat(point[:, None], 7, axis=1)
    out = cal.correlations(runs, point, boot)
    assert out[64]["spearman"] == pytest.approx(1.0) and out[64]["interval"] == (pytest.approx(1.0),) * 2
    out = cal.correlations(runs, point[::-1].copy(), boot[::-1].copy())
    assert out[64]["spearman"] == pytest.approx(-1.0)
    assert 192 not in out  # no runs there


@pytest.mark.slow
def test_small_report_matches_vtdsl_eval(tmp_path):
    """On v1's model, 42 test examples: calibrate's accuracies equal `vtdsl eval --rescale`'s
    on the same files, FastV's count variants run, and the grid-row shares add up."""
    from vtdsl.cli import main

    policies = tmp_path / "policies"
    policies.mkdir()
    for name in ("fastv", "visionzip-64", "pool-64"):
        shutil.copy(ROOT / "policies" / f"{name}.vt", policies)
    report = cal.calibrate("tiny-llava-vtbench", n=42, split="test", policies=policies, resamples=50, progress=False)
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"fastv", "fastv-192*", "fastv-128*", "fastv-64*", "visionzip-64", "pool-64"}
    result = CliRunner().invoke(main, ["eval", str(policies / "visionzip-64.vt"), str(policies / "pool-64.vt"),
                                       "--model", "tiny-llava-vtbench", "--n", "42", "--rescale", "--json"])
    assert result.exit_code == 0, result.output
    by_name = {r["policy"]: r for r in json.loads(result.stdout)["results"]}
    assert report["unpruned"]["accuracy"] == pytest.approx(by_name["unpruned"]["accuracy"])
    for label in ("visionzip-64", "pool-64"):
        assert rows[label]["accuracy"] == pytest.approx(by_name[label]["accuracy"])
        lo, hi = rows[label]["interval"]
        assert lo <= rows[label]["retention"] <= hi
    rows_of_grid = report["checks"]["rows_of_the_grid"]
    assert set(rows_of_grid["locate_accuracy_by_row"]["unpruned"]) == {"top", "middle", "bottom"}
    shares = rows_of_grid["fastv_64_kept_share_by_row"]
    assert set(shares) == {"top", "middle", "bottom"} and sum(shares.values()) == pytest.approx(1.0)
