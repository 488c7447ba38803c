"""Team search on one storage URL: several `vtdsl search` processes on a real PostgreSQL
server, the schema-creation race, and the one-line errors for every bad `--storage`.

The server is PostgreSQL's own binaries (initdb / pg_ctl, version 15 on these machines)
running a throw-away cluster on 127.0.0.1 at a free port, as an unprivileged user when
the tests run as root; the tests that need it skip, saying why, where the binaries are
absent. The searches use the hidden `_test-cost` objective (scores by cost, never runs a
model), slowed down by VTDSL_TEST_OBJECTIVE_SLEEP so that the processes overlap.
"""

from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from vtdsl.cli import main as cli
from vtdsl.search.objectives import SearchError
from vtdsl.search.run import SearchConfig, search
from vtdsl.search.storage import resolve

ROOT = Path(__file__).resolve().parent.parent
BUDGET = "flops <= 30%"
HOST = socket.gethostname()


# ------------------------------------------------------------------ the server


def _pg_bindir() -> str | None:
    """The newest PostgreSQL server binaries: /usr/lib/postgresql/N/bin (Debian), else
    initdb on PATH."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    for d in dirs + ([os.path.dirname(on_path)] if on_path else []):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    """A PostgreSQL cluster in a temp dir; initdb refuses root, so as root it runs as
    `nobody` (through runuser)."""

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="vtdsl-pg-")
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self.prefix = [shutil.which("runuser") or "runuser", "-u", "nobody", "--"]
        self.data = os.path.join(self.dir, "data")
        self.port = 0

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, os.path.join(self.bindir, tool), *args], capture_output=True, text=True,
                              timeout=120, cwd=self.dir)

    def start(self) -> None:
        res = self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        assert res.returncode == 0, res.stderr
        for _ in range(3):  # another process may take the free port first
            self.port = _free_port()
            res = self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "60", "-o",
                            f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off -c max_connections=200", "start")
            if res.returncode == 0:
                return
        raise AssertionError(f"PostgreSQL did not start: {res.stdout} {res.stderr} "
                             f"{Path(self.dir, 'log').read_text() if Path(self.dir, 'log').exists() else ''}")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self, db: str = "postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=db, autocommit=True)

    def fresh_database(self) -> str:
        name = "vt_" + uuid.uuid4().hex[:12]
        with self.connect() as con:
            con.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def pg():
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: "
                    "apt-get install postgresql-15 runs these tests")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _has_user("nobody")):
        pytest.skip("running as root, and there is no runuser / 'nobody' user to run PostgreSQL as")
    cluster = _Cluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# ------------------------------------------------------------------ reading a study


def _db_rows(cluster: _Cluster, url: str) -> list[tuple]:
    """(number, state, params, values, vtdsl record, worker) of every trial, straight from
    the tables (an optuna storage here would itself create the schema)."""
    import psycopg

    with cluster.connect(url.rsplit("/", 1)[1]) as con:
        try:
            trials = con.execute("SELECT trial_id, number, state FROM trials ORDER BY number").fetchall()
        except psycopg.errors.UndefinedTable:
            return []
        attrs = collections.defaultdict(dict)
        for tid, key, value in con.execute("SELECT trial_id, key, value_json FROM trial_user_attributes"):
            attrs[tid][key] = json.loads(value)
        params = collections.defaultdict(dict)
        for tid, name, value in con.execute("SELECT trial_id, param_name, param_value FROM trial_params"):
            params[tid][name] = value
        values = collections.defaultdict(list)
        for tid, obj, value in con.execute("SELECT trial_id, objective, value FROM trial_values ORDER BY objective"):
            values[tid].append(value)
    return [(n, state, params[tid], values[tid], attrs[tid].get("vtdsl"), attrs[tid].get("worker"))
            for tid, n, state in trials]


def _finished(rows) -> dict[int, tuple]:
    return {r[0]: r for r in rows if r[1] in ("COMPLETE", "PRUNED")}


def _cmd(space: Path, out: Path, url: str, trials: int) -> list[str]:
    return [sys.executable, "-m", "vtdsl", "search", str(space), "--model", "tiny-llava", "--budget", BUDGET,
            "--objective", "_test-cost", "--trials", str(trials), "--study", "team", "--storage", url, "-o", str(out),
            "--no-references", "--no-progress", "--json"]


def _env(sleep: float) -> dict:
    return {**os.environ, "VTDSL_TEST_OBJECTIVE_SLEEP": str(sleep), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------ the team


@pytest.mark.slow
def test_three_processes_share_one_postgresql_study_then_one_is_killed_and_resumed(pg, tmp_path):
    space = tmp_path / "d.vts"
    space.write_text((ROOT / "examples" / "design.vts").read_text())
    url, total = pg.fresh_database(), 20
    procs = [subprocess.Popen(_cmd(space, tmp_path / f"out{i}", url, total), env=_env(0.3), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline, victim = time.time() + 120, None
    while victim is None:  # kill a process that has finished trials of its own, mid-search
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.time() < deadline, "the team made no progress"
        time.sleep(0.1)
        done = _finished(_db_rows(pg, url))
        workers = collections.Counter(r[5] for r in done.values())
        if len(done) >= 4:
            victim = next((p for p in procs if workers[f"{HOST}:{p.pid}"]), None)
    team = [p for p in procs if p is not victim]
    victim.kill()
    victim.wait(timeout=30)
    kept = _finished(_db_rows(pg, url))
    outs = [p.communicate(timeout=180) for p in team]
    for p, (stdout, stderr) in zip(team, outs):
        assert p.returncode == 0, stderr
    # The two survivors took over the victim's slot: the study holds exactly `total`.
    rows = _db_rows(pg, url)
    done = _finished(rows)
    assert len(done) == total and all(done[n] == r for n, r in kept.items())
    for p, (stdout, _) in zip(team, outs):
        summary = json.loads(stdout)
        mine = sum(r[5] == f"{HOST}:{p.pid}" for r in done.values())
        assert summary["ran"] == mine and 0 <= summary["others"] <= total - mine
        assert summary["counts"]["finished"] == total
    by_victim = sum(r[5] == f"{HOST}:{victim.pid}" for r in done.values())
    assert sum(json.loads(o[0])["ran"] for o in outs) + by_victim == total
    # Resuming (here in this process) finds the study full: it runs nothing and fails the
    # trial the victim left running.
    resumed = search(SearchConfig(space=str(space), model="tiny-llava", budgets=[BUDGET], objective="_test-cost",
                                  trials=total, study="team", storage=url, out_dir=str(tmp_path / "resume"),
                                  references=False), progress=False)
    assert resumed.ran == 0 and resumed.others == 0 and resumed.counts["finished"] == total
    final = _db_rows(pg, url)
    assert _finished(final) == done
    states = collections.Counter(r[1] for r in final)
    assert states["COMPLETE"] + states["PRUNED"] == total and states["RUNNING"] == 0
    assert sorted(r[0] for r in final) == list(range(len(final)))
    # No policy was scored twice: every repeat points at the one trial that scored it.
    scored = [r[4]["policy"] for r in done.values() if r[1] == "COMPLETE" and r[4].get("duplicate_of") is None]
    assert len(scored) == len(set(scored))
    for r in done.values():
        if r[1] == "COMPLETE" and r[4].get("duplicate_of") is not None:
            origin = done[r[4]["duplicate_of"]]
            assert origin[4]["policy"] == r[4]["policy"] and origin[3] == r[3]
    data = json.loads((tmp_path / "resume" / "trials.json").read_text())
    assert data["counts"]["finished"] == total and data["storage"] == url


def _open_at_once(url: str, barrier, results) -> None:
    import optuna

    from vtdsl.search.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    barrier.wait()
    try:
        optuna.create_study(storage=open_storage(url), study_name="s", load_if_exists=True)
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports what went wrong
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_processes_opening_a_fresh_postgresql_database_at_once_all_join(pg):
    """Unserialised, optuna's table creation races (CREATE TYPE studydirection:
    UniqueViolation) for all but one of the processes."""
    url = pg.fresh_database()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_open_at_once, args=(url, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [results.get(timeout=10) for _ in procs] == ["ok"] * 6
    with pg.connect(url.rsplit("/", 1)[1]) as con:
        assert con.execute("SELECT count(*) FROM studies").fetchone()[0] == 1


# ------------------------------------------------------------------ bad --storage


@pytest.fixture
def run_cli(tmp_path):
    """`vtdsl search` in this process (the command sets a SIGTERM handler: restored)."""
    space = tmp_path / "t.vts"
    space.write_text("at vit.layer{4, 8} keep cls top {10%, 50%}\n")
    previous = signal.getsignal(signal.SIGTERM)

    def run(storage: str):
        args = ["search", str(space), "--model", "tiny-llava", "--objective", "_test-cost", "--trials", "2",
                "--no-references", "--no-progress", "-o", str(tmp_path / "out"), "--storage", storage]
        return CliRunner().invoke(cli, args)

    yield run
    signal.signal(signal.SIGTERM, previous)


def _closed_port() -> int:
    return _free_port()  # nothing listens there once the probe socket is closed


def _bad_storages(tmp: Path) -> list[tuple[str, str]]:
    (tmp / "adir").mkdir()
    (tmp / "garbage.db").write_bytes(bytes(range(256)) * 4)
    (tmp / "afile").write_text("x")
    port = _closed_port()
    return [
        ("foo://bar", "unknown database kind 'foo'"),
        ("not a url", "not a database URL"),
        ("sqlite://", "in-memory SQLite database"),
        ("sqlite:///:memory:", "in-memory SQLite database"),
        (f"sqlite:///{tmp}/adir", "is a directory, not a database file"),
        (f"sqlite:///{tmp}/garbage.db", "is not an SQLite database"),
        (f"sqlite:///{tmp}/afile/sub/study.db", "cannot make the folder"),
        ("mysql://u@127.0.0.1/x", "driver 'MySQLdb' is not installed"),
        ("postgresql+psycopg2://u@127.0.0.1/x", "driver 'psycopg2' is not installed"),
        (f"postgresql+psycopg://u@127.0.0.1:{port}/x", "cannot open the study database: connection"),
        (f"postgres://u:hunter2@127.0.0.1:{port}/x", "cannot open the study database: connection"),
    ]


def test_every_bad_storage_is_one_line_and_exit_2(run_cli, tmp_path):
    import importlib.util

    for url, expected in _bad_storages(tmp_path):
        module = {"mysql": "MySQLdb", "postgresql+psycopg2": "psycopg2"}.get(url.split(":")[0])
        if module and importlib.util.find_spec(module) is not None:
            continue  # that driver is installed here: not a bad URL on this machine
        res = run_cli(url)
        lines = res.stderr.splitlines()
        assert res.exit_code == 2 and res.stdout == "" and len(lines) == 1, (url, res.output)
        assert lines[0].startswith("error: --storage ") and expected in lines[0], (url, lines[0])
        assert "hunter2" not in res.output and "Traceback" not in res.output


def test_missing_postgresql_driver_is_one_line(run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    res = run_cli("postgresql://me@127.0.0.1:5432/vt")
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1, res.output
    assert "driver 'psycopg' is not installed" in res.stderr and "pip install 'psycopg[binary]'" in res.stderr


def test_postgresql_urls_mean_psycopg():
    assert resolve("postgresql://me:pw@db.example:5433/vt") == "postgresql+psycopg://me:pw@db.example:5433/vt"
    assert resolve("postgres://me@db/vt") == "postgresql+psycopg://me@db/vt"
    assert resolve("postgresql+psycopg://me@db/vt") == "postgresql+psycopg://me@db/vt"
    with pytest.raises(SearchError, match="unknown database kind"):
        resolve("postgresq://me@db/vt")


def test_summary_line_counts_this_process_and_the_others():
    from vtdsl.cli.search_cmd import _render_result
    from vtdsl.search.run import SearchResult

    counts = {"total": 31, "finished": 30, "evaluated": 14, "duplicates": 4, "over_budget": 12, "invalid": 4,
              "error": 0, "failed": 1, "running": 0}
    result = SearchResult(study="team", storage="sqlite:///x.db", out_dir="o", model="tiny-llava", objective="agreement",
                          budgets=[], trials=[], best=None, pareto=[], references=[], counts=counts, files={},
                          ran=10, others=20)
    first = _render_result(result, None).splitlines()[0]
    assert first == ("study team: 30 finished trials (10 in this run, 20 by other processes): 14 evaluated "
                     "(4 repeats), 12 over budget, 4 invalid, 0 errors, 1 failed")
    result.others = 0
    assert "(10 in this run): " in _render_result(result, None)
