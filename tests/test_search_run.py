"""`vtdsl search`: cost-model pre-filtering, outputs, objectives, resumption, workers.

The search runs on tiny-llava's spec; only the agreement test builds the model. The
others use a fake objective (in process) or the hidden `_test-cost` objective (in
subprocesses), which scores by cost and never runs a model.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from vtdsl.cost import estimate, parse_budget, verdicts
from vtdsl.ir import check
from vtdsl.lang import PolicyError, format_policy, format_source, parse
from vtdsl.models import get_spec
from vtdsl.search import load_space
from vtdsl.search.objectives import Agreement, SearchError, vtbench_missing
from vtdsl.search.run import SearchConfig, search

ROOT = Path(__file__).resolve().parent.parent
SPEC = get_spec("tiny-llava")
BUDGET = "flops <= 30%"
# 5 x 2 x (2 + 1) = 30 points. 'diverse 600' asks for more tokens than can remain: 10
# invalid points. FLOPs on tiny-llava (vtdsl check): without the LLM stage only layers 4, 8
# and 12 at 10% fit 30% (layer 16 at 10% is 30.02%); with 'diverse 16' layers 4..12 at both
# percentages and 16 at 10% fit: 3 + 7 = 10 feasible points, 7 + 3 = 10 over budget.
SPACE = ('policy "t"\n'
         "at vit.layer{4..20 step 4} keep cls top {10%, 50%}\n"
         "at? llm.layer2 keep diverse {16, 600}\n")


def _classify(space, budget: str) -> dict[str, str]:
    """Canonical policy -> 'ok' | 'over' | 'invalid' for every point, computed directly."""
    out = {}
    b = parse_budget(budget)
    for point in space.points():
        text = space.candidate(point).text
        try:
            plan = check(parse(text), SPEC)
        except PolicyError:
            out[text] = "invalid"
            continue
        out[text] = "ok" if all(v["ok"] for v in verdicts(estimate(plan), [b])) else "over"
    return out


class FakeObjective:
    name = "fake"

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, plan):
        self.seen.append(format_policy(plan.policy))
        report = estimate(plan)
        return {"score": 1.0 - abs(report.flops_ratio - 0.2), "flops": report.flops_ratio}


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "t.vts"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def filtered(space_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("filtered")
    fake = FakeObjective()
    cfg = SearchConfig(space=str(space_file), model="tiny-llava", budgets=[BUDGET], trials=24, out_dir=str(out),
                       references=False, seed=0)
    result = search(cfg, progress=False, objective=fake)
    return result, fake, out


def test_budget_filter_never_runs_the_objective_on_rejected_candidates(filtered, space_file):
    result, fake, _ = filtered
    kinds = _classify(load_space(space_file), BUDGET)
    assert collections.Counter(kinds.values()) == {"ok": 10, "over": 10, "invalid": 10}
    assert fake.seen, "nothing was evaluated"
    assert all(kinds[text] == "ok" for text in fake.seen)
    rows = result.trials
    assert len(rows) == 24 and result.counts["finished"] == 24
    for r in rows:
        assert r["state"] in ("COMPLETE", "PRUNED")
        expected = kinds[r["policy"]]
        assert r["status"] == {"ok": "ok", "over": "over_budget", "invalid": "invalid"}[expected]
        assert (r["state"] == "COMPLETE") == (expected == "ok")
    over = [r for r in rows if r["status"] == "over_budget"]
    assert over and all(r["reason"].startswith("over budget: flops") for r in over)
    assert {r["policy"] for r in over}.isdisjoint(fake.seen)
    # One objective call per distinct feasible policy; repeats reuse the score.
    evaluated = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(fake.seen) == len(set(fake.seen)) == len([r for r in evaluated if r["duplicate_of"] is None])


def test_best_policy_file_is_canonical_and_within_budget(filtered):
    result, _, out = filtered
    text = (out / "best.vt").read_text()
    assert format_source(text) == text
    policy = parse(text)
    assert policy.model == "tiny-llava" and [b.metric for b in policy.budgets] == ["flops"]
    report = estimate(check(policy, SPEC))
    assert all(v["ok"] for v in verdicts(report, policy.budgets))
    best = result.best
    assert best["score"] == max(r["score"] for r in result.trials if r["state"] == "COMPLETE")
    assert format_policy(policy.model_copy(update={"model": None, "budgets": []})) == best["policy"]
    assert f"score {best['score']:.4f}" in text and f"FLOPs {100 * report.flops_ratio:.2f}%" in text


def test_trials_json_schema(filtered, space_file):
    _, _, out = filtered
    data = json.loads((out / "trials.json").read_text())
    assert {"schema", "study", "storage", "space", "model", "objective", "directions", "budgets", "counts", "best",
            "pareto", "references", "trials"} <= set(data)
    assert data["schema"] == 1 and data["model"] == "tiny-llava" and data["budgets"] == ["flops <= 30%"]
    assert data["space"]["count"] == 30 and [h["name"] for h in data["space"]["holes"]] == ["2:13", "2:41", "3:1", "3:29"]
    space = load_space(space_file)
    numbers = [t["number"] for t in data["trials"]]
    assert numbers == list(range(24))
    for t in data["trials"]:
        assert {"number", "state", "status", "params", "point", "policy", "cost", "score", "metrics", "values",
                "reason", "duplicate_of", "worker", "duration_s"} <= set(t)
        assert space.point(t["point"]) == t["params"]
        assert space.candidate(t["params"]).text == t["policy"]
        if t["state"] == "COMPLETE":
            assert isinstance(t["score"], float) and t["values"] == [t["score"]] and t["reason"] is None
            assert 0 < t["cost"]["flops_ratio"] <= 0.30 and t["cost"]["visual_tokens"] >= 0
        else:
            assert t["score"] is None and t["reason"]
            assert (t["cost"] is None) == (t["status"] == "invalid" and "diverse 600" in t["policy"])
    front = data["pareto"]
    assert front and data["best"]["number"] in front
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_search_and_references(space_file, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "good.vt").write_text('policy "good"\nat vit.layer4 keep cls top 10%\n')
    (zoo / "bad.vt").write_text("at llm.layer40 drop all\n")  # tiny-llava has 32 LLM layers
    cfg = SearchConfig(space=str(space_file), model="tiny-llava", budgets=[BUDGET], trials=16, out_dir=str(tmp_path / "o"),
                       pareto=True, zoo_dir=str(zoo), seed=1)
    result = search(cfg, progress=False, objective=FakeObjective())
    front = result.pareto
    assert front
    assert [r["cost"]["flops_ratio"] for r in front] == sorted(r["cost"]["flops_ratio"] for r in front)
    assert [r["score"] for r in front] == sorted(r["score"] for r in front)
    assert all(len(r["values"]) == 2 and r["values"][0] == r["cost"]["flops_ratio"] for r in result.trials
               if r["state"] == "COMPLETE")
    refs = {r["name"]: r for r in result.references}
    assert refs["unpruned"]["score"] == pytest.approx(0.2) and refs["unpruned"]["within_budget"] is False
    assert refs["good"]["status"] == "ok" and refs["good"]["within_budget"] is True
    assert refs["bad"]["status"] == "invalid"
    matched = [r for r in result.references if r["kind"] in ("random", "pool")]
    assert {r["kind"] for r in matched} == {"random", "pool"}
    for r in matched:
        assert r["status"] == "ok" and r["cost"]["flops"] <= result.best["cost"]["flops"]
    assert "| reference |" in (tmp_path / "o" / "pareto.md").read_text()


def test_agreement_objective():
    obj = Agreement(SPEC, prompts=1, positions=4)
    same = obj(check("", SPEC))
    assert same["agreement"] == 1.0 and same["kl"] < 1e-9 and same["score"] == pytest.approx(1.0)
    pruned = obj(check("at vit.layer4 keep cls top 8", SPEC))
    assert 0.0 <= pruned["agreement"] <= 1.0 and pruned["kl"] > 1e-6
    assert pruned["score"] < 1.0 and pruned["predictions"] == 4
    # Agreement first, KL breaks ties: the KL term never outweighs one prediction.
    assert pruned["agreement"] - 1 / 5 < pruned["score"] <= pruned["agreement"]


def test_objective_errors(space_file, tmp_path):
    cfg = SearchConfig(space=str(space_file), model="tiny-llava", objective="accuracy", out_dir=str(tmp_path))
    with pytest.raises(SearchError, match="defined for 'tiny-llava-vtbench2' and 'tiny-llava-vtbench', not 'tiny-llava'"):
        search(cfg, progress=False)
    if vtbench_missing() is not None:  # until the trained model ships
        cfg = SearchConfig(space=str(space_file), model="tiny-llava-vtbench", objective="accuracy", out_dir=str(tmp_path))
        with pytest.raises(SearchError, match="tiny-llava-vtbench' is not available"):
            search(cfg, progress=False)
    cfg = SearchConfig(space=str(space_file), model="tiny-llava", objective="agreemnt", out_dir=str(tmp_path))
    with pytest.raises(SearchError, match="did you mean|unknown objective"):
        search(cfg, progress=False)


def test_resuming_another_search_is_refused(space_file, tmp_path):
    cfg = SearchConfig(space=str(space_file), model="tiny-llava", budgets=[BUDGET], trials=2, out_dir=str(tmp_path),
                       study="s", objective="_test-cost", references=False)
    assert search(cfg, progress=False).counts["finished"] == 2
    cfg.budgets = ["flops <= 40%"]
    with pytest.raises(SearchError, match="made for another search"):
        search(cfg, progress=False)


# ------------------------------------------------------------------ subprocess runs


def _cli(space: Path, out: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vtdsl", "search", str(space), "--model", "tiny-llava", "--budget", BUDGET,
            "--objective", "_test-cost", "--trials", str(trials), "-o", str(out), "--study", "s",
            "--no-references", "--no-progress", "--json", *extra]


def _env(sleep: float) -> dict:
    return {**os.environ, "VTDSL_TEST_OBJECTIVE_SLEEP": str(sleep), "PYTHONPATH": str(ROOT)}


def _finished(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _wait_for(proc, db: Path, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while _finished(db) < n:
        assert proc.poll() is None, f"the search ended before {n} trials: {proc.communicate()}"
        assert time.time() < deadline, "the search made no progress"
        time.sleep(0.1)


def _trials(db: Path) -> dict[int, tuple]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    study = optuna.load_study(study_name="s", storage=storage)
    return {t.number: (t.state.name, t.params, t.values, t.user_attrs.get("vtdsl")) for t in study.get_trials()}


def test_killed_search_resumes_without_losing_finished_trials(space_file, tmp_path):
    space = tmp_path / "d.vts"
    space.write_text((ROOT / "examples" / "design.vts").read_text())
    out, db, total = tmp_path / "out", tmp_path / "out" / "study.db", 40
    # 1. SIGINT: the running trial fails, the outputs of the finished ones are written, exit 130.
    proc = subprocess.Popen(_cli(space, out, total), env=_env(0.3), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(proc, db, 4)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "resume with:" in stderr and "--study s" in stderr
    first = _trials(db)
    done1 = {n: t for n, t in first.items() if t[0] in ("COMPLETE", "PRUNED")}
    assert 4 <= len(done1) < total
    assert json.loads(stdout)["counts"]["finished"] == len(done1) and json.loads(stdout)["interrupted"]
    # 2. SIGKILL: nothing runs; whatever was finished is in the database.
    proc = subprocess.Popen(_cli(space, out, total), env=_env(0.3), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for(proc, db, len(done1) + 3)
    proc.kill()
    proc.wait(timeout=30)
    second = _trials(db)
    done2 = {n: t for n, t in second.items() if t[0] in ("COMPLETE", "PRUNED")}
    assert all(done2[n] == t for n, t in done1.items())
    assert len(done2) < total
    # 3. Resume to the end: every finished trial is kept as it was, none is lost or doubled.
    res = subprocess.run(_cli(space, out, total), env=_env(0), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    final = _trials(db)
    assert all(final[n] == t for n, t in done2.items())
    states = collections.Counter(t[0] for t in final.values())
    assert states["COMPLETE"] + states["PRUNED"] == total
    assert states["RUNNING"] == 0 and set(states) <= {"COMPLETE", "PRUNED", "FAIL"}
    assert sorted(final) == list(range(len(final)))
    data = json.loads((out / "trials.json").read_text())
    assert data["counts"]["finished"] == total and len(data["trials"]) == len(final)
    assert json.loads(res.stdout)["ran"] == total - len(done2)


def test_two_workers_share_one_study_without_duplicates_or_losses(space_file, tmp_path):
    out = tmp_path / "w"
    res = subprocess.run(_cli(space_file, out, 24, "--workers", "2"), env=_env(0.05), cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    final = _trials(out / "study.db")
    assert sorted(final) == list(range(24))
    assert all(t[0] in ("COMPLETE", "PRUNED") for t in final.values())
    data = json.loads((out / "trials.json").read_text())
    workers = collections.Counter(t["worker"] for t in data["trials"])
    assert sorted(workers.values()) == [12, 12], workers
    assert data["counts"]["finished"] == 24


def test_accuracy_objective_scores_the_shipped_model(tmp_path):
    """The `accuracy` objective on tiny-llava-vtbench: the best trial's score is the vtbench
    validation accuracy of its policy, as the harness measures it directly."""
    import vtdsl.compiler as vc
    from vtdsl.eval import bench
    from vtdsl.eval.harness import evaluate
    from vtdsl.models.vtbench import load_tiny_vtbench

    space = tmp_path / "one.vts"
    space.write_text("at vit.layer{2} keep cls top 50%\n")
    cfg = SearchConfig(space=str(space), model="tiny-llava-vtbench", objective="accuracy", trials=1,
                       objective_options={"examples": 20}, references=False, text_tokens=16,
                       out_dir=str(tmp_path / "out"))
    result = search(cfg, progress=False)
    model, processor = load_tiny_vtbench()
    with vc.apply("at vit.layer2 keep cls top 50%", model):
        direct = evaluate(model, bench.generate("val", 20), processor, progress=False)
    assert result.best["score"] == pytest.approx(direct["overall"])
    assert 0.5 < direct["overall"] <= 1.0  # a trained model: far above the answer prior


@pytest.mark.slow
def test_workers_never_score_one_policy_twice(tmp_path):
    """Four feasible points, twelve trials, two workers: every policy is scored once; a
    worker that draws a policy the other is scoring waits for it and reuses its score."""
    space = tmp_path / "four.vts"
    space.write_text("at vit.layer{4, 8} keep cls top {5%, 10%}\n")
    out = tmp_path / "w"
    res = subprocess.run(_cli(space, out, 12, "--workers", "2"), env=_env(0.4), cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    rows = json.loads((out / "trials.json").read_text())["trials"]
    assert len(rows) == 12 and all(r["state"] == "COMPLETE" for r in rows)
    scored = [r["policy"] for r in rows if r["duplicate_of"] is None]
    assert len(scored) == len(set(scored)) <= 4
    by_number = {r["number"]: r for r in rows}
    for r in rows:
        if r["duplicate_of"] is not None:
            origin = by_number[r["duplicate_of"]]
            assert origin["duplicate_of"] is None and origin["policy"] == r["policy"] and origin["score"] == r["score"]
    assert len({r["worker"] for r in rows}) == 2


def test_references_show_progress(space_file, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for i in (4, 8):
        (zoo / f"z{i}.vt").write_text(f"at vit.layer{i} keep cls top 10%\n")
    cfg = SearchConfig(space=str(space_file), model="tiny-llava", budgets=[BUDGET], trials=3, out_dir=str(tmp_path / "o"),
                       zoo_dir=str(zoo))
    result = search(cfg, progress=True, objective=FakeObjective())
    n = len(result.references)
    assert n == 1 + 2 + 2  # unpruned, the two zoo files, the random and pooling baselines
    err = capsys.readouterr().err
    assert "scoring the reference policies" in err
    assert any(line.startswith("references") and f"{n}/{n}" in line for line in err.splitlines()), err


@pytest.mark.skipif(vtbench_missing() is not None, reason="the trained tiny-llava-vtbench is not available")
def test_model_loading_bars_only_when_verbose(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    space = tmp_path / "one.vts"
    space.write_text("at vit.layer{2} keep cls top 50%\n")
    was = hf_logging.is_progress_bar_enabled()
    try:
        seen = {}
        for verbose in (True, False):
            hf_logging.enable_progress_bar()
            cfg = SearchConfig(space=str(space), model="tiny-llava-vtbench", objective="accuracy", trials=1,
                               objective_options={"examples": 4}, references=False, text_tokens=16,
                               out_dir=str(tmp_path / f"out{verbose}"), verbose=verbose)
            search(cfg, progress=False)
            seen[verbose] = "Loading weights" in capfd.readouterr().err
        assert seen == {True: True, False: False}
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
