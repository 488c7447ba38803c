"""Budget search over a policy space with optuna.

    from vtdsl.search.run import SearchConfig, search
    result = search(SearchConfig(space="examples/design.vts", model="tiny-llava",
                                 budgets=["flops <= 50%"], trials=40))
    result.best["policy"], result.pareto

Every trial: the sampler picks a point of the space (one parameter per hole) -> the point
is instantiated and parsed (a real policy) -> checked against the model (`vtdsl.ir.check`)
and costed (`vtdsl.cost.estimate`) -> if invalid or over budget the trial is *pruned*,
with `status` and `reason` user attributes, and the model is never run -> otherwise the
objective scores it. A candidate already scored in this study (same canonical policy)
reuses its score (`duplicate_of`).

Samplers: TPE (one objective, maximised) or NSGA-II (`pareto=True`: minimise the FLOPs
ratio, maximise the score). `trials` is the number of *finished* trials (complete or
pruned) the study should hold: a resumed study runs only the missing ones, and
`workers` local processes share them (n_trials split exactly, so the total is `trials`:
no duplicates, no losses). Storage: any optuna RDB URL; SQLite `DIR/study.db` by default.
Trials left RUNNING by a killed search are marked FAIL when the search resumes (their
process is gone), so a study only ever holds finished trials and failed ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from ..lang.errors import PolicyError

DEFAULT_TRIALS = 50
DEFAULT_OUT = os.path.join("out", "search")


class SearchInterrupted(Exception):
    """Raised by `search` after SIGINT/SIGTERM, once the outputs of the finished trials are
    written; `.result` holds them."""

    def __init__(self, result: "SearchResult"):
        super().__init__("interrupted")
        self.result = result


@dataclasses.dataclass
class SearchConfig:
    space: str  # path of the space file
    model: str | None = None  # default: the space's `model` line
    budgets: list[str] = dataclasses.field(default_factory=list)  # on top of the space's budget lines
    objective: str | Callable = "agreement"
    objective_options: dict = dataclasses.field(default_factory=dict)
    trials: int = DEFAULT_TRIALS
    study: str | None = None
    storage: str | None = None
    out_dir: str | None = None
    workers: int = 1
    seed: int = 0
    pareto: bool = False
    references: bool = True
    zoo_dir: str | None = None
    text_tokens: int = 64
    syntax: str | None = None
    weights: str | None = None


@dataclasses.dataclass
class SearchResult:
    study: str
    storage: str
    out_dir: str
    model: str
    objective: str
    budgets: list[str]
    trials: list[dict]
    best: dict | None
    pareto: list[dict]
    references: list[dict]
    counts: dict
    files: dict
    interrupted: bool = False
    ran: int = 0  # trials finished by this invocation

    def summary(self) -> dict:
        return {
            "study": self.study, "storage": self.storage, "out_dir": self.out_dir, "model": self.model,
            "objective": self.objective, "budgets": self.budgets, "counts": self.counts, "ran": self.ran,
            "best": self.best, "pareto": self.pareto, "references": self.references, "files": self.files,
            "interrupted": self.interrupted,
        }


# ---------------------------------------------------------------------------------------
# Set-up shared by the main process and the workers


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*heartbeat.*")


def resolve_spec(name: str):
    """A model spec by name; tiny-llava-vtbench from vtdsl.models.vtbench when the registry
    does not list it yet."""
    from ..models import get_spec

    try:
        return get_spec(name)
    except PolicyError:
        if name == "tiny-llava-vtbench":
            from .objectives import ObjectiveUnavailable, vtbench_missing

            missing = vtbench_missing()
            try:
                if missing is None:
                    from ..models.vtbench import vtbench_spec

                    return vtbench_spec()
            except Exception as exc:  # noqa: BLE001 - a broken config is reported, not raised
                missing = f"{type(exc).__name__}: {exc}"
            raise ObjectiveUnavailable(f"the trained model 'tiny-llava-vtbench' is not available: {missing}",
                                       hint="it ships with vtbench (examples/train_tiny_vlm.py trains it); "
                                            "until then search another model") from None
        raise


def _objective_name(objective) -> str:
    if isinstance(objective, str):
        return objective
    return getattr(objective, "name", None) or getattr(objective, "__name__", type(objective).__name__)


def _sqlite_url(path: str) -> str:
    return "sqlite:///" + os.path.abspath(path)


def open_storage(url: str):
    """An optuna RDBStorage (heartbeats on; SQLite waits for locks instead of failing)."""
    import optuna

    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
        m = re.match(r"sqlite:///(.+)", url)
        if m and m.group(1) != ":memory:":
            Path(m.group(1)).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=60, **kwargs)
    if url.startswith("sqlite"):
        _sqlite_pragmas(storage.engine)
    return storage


def _sqlite_pragmas(engine) -> None:
    """WAL journal, fsync at checkpoints only: a commit survives the process being
    killed (not a power cut), and a trial's ~20 small commits stop costing seconds."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, record):  # noqa: ARG001
        cur = dbapi_connection.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    engine.dispose()


def _sampler(cfg: SearchConfig, seed: int):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.pareto:
            population = max(4, min(50, cfg.trials // 4))
            return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=max(2, min(10, cfg.trials // 4)))


def _directions(cfg: SearchConfig) -> list[str]:
    return ["minimize", "maximize"] if cfg.pareto else ["maximize"]


def _parse_budgets(texts: list[str]):
    from ..cost import parse_budget

    return [parse_budget(t) for t in texts]


class _Context:
    """What a process needs to run trials: the space, the model spec, budgets, objective."""

    def __init__(self, cfg: SearchConfig, objective=None):
        from .space import load_space

        self.cfg = cfg
        self.space = load_space(cfg.space, cfg.syntax)
        model = cfg.model or self.space.base_policy().model
        if model is None:
            from .objectives import SearchError

            raise SearchError(f"no model to search on: {self.space.filename} has no `model \"...\"` line",
                              hint="pass --model NAME (see `vtdsl models`)")
        self.spec = resolve_spec(model)
        self.budgets = _parse_budgets(cfg.budgets)
        self.objective_name = _objective_name(objective if objective is not None else cfg.objective)
        self._objective = objective
        self.cache: dict[str, dict] = {}

    @property
    def objective(self):
        if self._objective is None:
            if callable(self.cfg.objective) and not isinstance(self.cfg.objective, str):
                self._objective = self.cfg.objective
            else:
                from .objectives import make_objective

                opts = dict(self.cfg.objective_options)
                opts.setdefault("text_tokens", self.cfg.text_tokens)
                if self.cfg.weights:
                    opts.setdefault("weights", self.cfg.weights)
                self._objective = make_objective(self.cfg.objective, self.spec, **opts)
        return self._objective

    def fingerprint(self) -> dict:
        return {
            "space_sha256": hashlib.sha256(self.space.source.encode("utf-8")).hexdigest(),
            "space": os.path.basename(self.space.filename),
            "model": self.spec.name,
            "objective": self.objective_name,
            "objective_options": {k: v for k, v in sorted(self.cfg.objective_options.items())},
            "weights": os.path.abspath(self.cfg.weights) if self.cfg.weights else None,
            "pareto": self.cfg.pareto,
            "budgets": [b for b in self.cfg.budgets],
            "text_tokens": self.cfg.text_tokens,
        }

    # -- one candidate ------------------------------------------------------------------
    def assess(self, point: dict) -> dict:
        """Instantiate, check and cost a point without running any model.

        Returns a dict with `status` ("ok", "invalid", "over_budget"), `policy`, `reason`,
        `cost` and, when ok, `plan`.
        """
        from ..cost import estimate, verdicts
        from ..ir import check

        space = self.space
        try:
            cand = space.candidate(point)
        except PolicyError as err:
            d = err.diagnostics[0] if err.diagnostics else None
            where = f"{space.filename}:{d.span.line}:{d.span.column}: " if d and d.span else ""
            return {"status": "invalid", "policy": None, "reason": where + (d.message if d else str(err))}
        out: dict[str, Any] = {"policy": cand.text}
        try:
            plan = check(cand.policy, self.spec, source=cand.rendered.text, filename=space.filename)
        except PolicyError as err:
            out.update(status="invalid", reason=space.where(err, cand.rendered))
            return out
        report = estimate(plan, text_tokens=self.cfg.text_tokens)
        out["cost"] = cost_of(report)
        judged = verdicts(report, list(cand.policy.budgets) + list(self.budgets))
        over = [v for v in judged if not v["ok"]]
        if over:
            out.update(status="over_budget", reason="over budget: " + "; ".join(_over_text(v) for v in over))
            return out
        out.update(status="ok", plan=plan, budget=[v["constraint"] for v in judged])
        return out

    def score(self, plan) -> dict:
        value = self.objective(plan)
        if isinstance(value, dict):
            metrics = dict(value)
        else:
            metrics = {"score": float(value)}
        metrics["score"] = float(metrics["score"])
        return metrics


def cost_of(report) -> dict:
    return {
        "flops_ratio": report.flops_ratio,
        "flops": report.flops,
        "flops_fastv_ratio": report.fastv_ratio,
        "kv_ratio": report.kv_ratio,
        "visual_tokens": report.visual_tokens_to_llm,
    }


def _over_text(v: dict) -> str:
    pct = v.get("percent_of_baseline")
    shown = f"{pct:.2f}%" if pct is not None and "%" in v["constraint"] else f"{v['value']:g}"
    return f"{v['metric']} {shown} (limit {v['constraint']})"


class _Interrupts:
    """SIGINT / SIGTERM as KeyboardInterrupt, but only at safe points.

    Raised anywhere, the interrupt can land inside one of optuna's storage writes and leave
    this process's SQLite transaction open; the cleanup that follows (failing the running
    trial, writing the outputs) then waits on that lock. So a signal raises at once only
    while a candidate is being scored (`scoring()`, our own code, where waiting would make
    Ctrl-C unresponsive); elsewhere it is held until the next `check()`: the start of a
    trial, the end of scoring, the end of a trial.
    """

    def __init__(self) -> None:
        self.pending = False
        self.safe = False

    def _handler(self, signum, frame) -> None:
        if self.safe:
            self.safe = False
            raise KeyboardInterrupt
        self.pending = True

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def check(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def scoring(self):
        self.check()
        self.safe = True
        try:
            yield
        finally:
            self.safe = False
        self.check()


_INTERRUPTS = _Interrupts()


class _Objective:
    """The optuna objective of one process."""

    def __init__(self, ctx: _Context, study):
        self.ctx = ctx
        self.study = study
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _lookup(self, policy: str) -> dict | None:
        hit = self.ctx.cache.get(policy)
        if hit is not None:
            return hit
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            rec = t.user_attrs.get("vtdsl") or {}
            if rec.get("policy") == policy and rec.get("duplicate_of") is None and "metrics" in rec:
                hit = {"metrics": rec["metrics"], "number": t.number}
                self.ctx.cache[policy] = hit
                return hit
        return None

    def __call__(self, trial):
        import optuna

        _INTERRUPTS.check()
        trial.set_user_attr("worker", self.worker)
        started = time.perf_counter()
        point = self.ctx.space.suggest(trial)
        info = self.ctx.assess(point)
        record: dict[str, Any] = {"point": self.ctx.space.index(point), "policy": info.get("policy"),
                                  "cost": info.get("cost"), "status": info["status"]}
        if info["status"] != "ok":
            record["reason"] = info["reason"]
            trial.set_user_attr("vtdsl", _jsonable(record))
            raise optuna.TrialPruned(info["reason"])
        hit = self._lookup(info["policy"])
        if hit is not None:
            metrics = hit["metrics"]
            record["duplicate_of"] = hit["number"]
        else:
            from .objectives import SearchError

            try:
                with _INTERRUPTS.scoring():
                    metrics = self.ctx.score(info["plan"])
            except SearchError:
                raise
            except Exception as exc:  # noqa: BLE001 - one candidate the model cannot run is recorded, not fatal
                record.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
                trial.set_user_attr("vtdsl", _jsonable(record))
                raise optuna.TrialPruned(str(exc)) from None
            self.ctx.cache[info["policy"]] = {"metrics": metrics, "number": trial.number}
        record["metrics"] = metrics
        record["eval_s"] = round(time.perf_counter() - started, 4)
        trial.set_user_attr("vtdsl", _jsonable(record))
        score = float(metrics["score"])
        if self.ctx.cfg.pareto:
            return info["cost"]["flops_ratio"], score
        return score


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# ---------------------------------------------------------------------------------------
# Study bookkeeping


def _fail_orphans(study, mine: bool = False) -> int:
    """Mark FAIL the RUNNING trials whose process (on this host) is gone, and with `mine`
    those of this process (after an interrupt, nothing here runs them any more)."""
    import optuna

    host = socket.gethostname()
    me = f"{host}:{os.getpid()}"
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        dead = worker is None or (mine and worker == me)
        if worker is not None and not dead:
            h, _, pid = worker.rpartition(":")
            dead = h == host and pid.isdigit() and not _alive(int(pid))
        if dead:
            try:
                study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
                study._storage.set_trial_user_attr(t._trial_id, "vtdsl", {**(t.user_attrs.get("vtdsl") or {}),
                                                                           "status": "killed"})
                failed += 1
            except Exception:  # noqa: BLE001 - finished meanwhile
                pass
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _finished(study) -> int:
    import optuna

    S = optuna.trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED)))


def _open_study(ctx: _Context, storage_url: str, study_name: str, seed: int, create: bool):
    import optuna

    storage = open_storage(storage_url)
    sampler = _sampler(ctx.cfg, seed)
    if create:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                    directions=_directions(ctx.cfg), load_if_exists=True)
    else:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    return study


def _check_fingerprint(study, ctx: _Context, storage_url: str) -> None:
    mine = ctx.fingerprint()
    theirs = study.user_attrs.get("vtdsl")
    if theirs is None:
        if study.get_trials(deepcopy=False):
            from .objectives import SearchError

            raise SearchError(f"study '{study.study_name}' in {storage_url} was not made by vtdsl search",
                              hint="choose another --study name")
        study.set_user_attr("vtdsl", mine)
        return
    diffs = [k for k in mine if theirs.get(k) != mine[k]]
    if diffs:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} now" for k in diffs[:3])
        from .objectives import SearchError

        raise SearchError(f"study '{study.study_name}' was made for another search ({shown})",
                          hint="resume with the same space, model, objective and budgets, or choose another "
                               "--study name")


def default_study_name(cfg: SearchConfig, model: str, objective: str) -> str:
    stem = Path(cfg.space).stem
    name = f"{stem}-{model}-{objective.lstrip('_')}" + ("-pareto" if cfg.pareto else "")
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", name)


# ---------------------------------------------------------------------------------------
# Workers


def _split(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _watch_parent(parent: int) -> None:
    """In a worker: stop (as if interrupted) when the parent search process dies."""

    def loop():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGINT)
                return

    threading.Thread(target=loop, daemon=True).start()


def _worker_main(cfg: SearchConfig, storage_url: str, study_name: str, n_trials: int, seed: int,
                 parent: int, threads: int) -> None:
    try:
        _watch_parent(parent)
        if threads:
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:  # pragma: no cover
                pass
        _quiet_optuna()
        ctx = _Context(cfg)
        study = _open_study(ctx, storage_url, study_name, seed, create=False)
        with _INTERRUPTS.installed():
            study.optimize(_Objective(ctx, study), n_trials=n_trials, catch=(),
                           callbacks=[lambda s, t: _INTERRUPTS.check()])
            _INTERRUPTS.check()
    except KeyboardInterrupt:
        sys.exit(130)
    except PolicyError as err:
        print(err.format(), file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - SearchError and anything unexpected: say it, exit 2
        print(err.format() if hasattr(err, "format") else f"error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------
# Progress


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool, pareto: bool):
        self.enabled = enabled
        self.pareto = pareto
        self.total, self.done = total, done
        self.bar = None

    def start(self) -> None:
        """Start drawing (a thread); after any worker process is forked."""
        total, done = self.total, self.done
        if self.enabled and self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("", total=total, completed=done)

    def update(self, study) -> None:
        if self.bar is None:
            return
        import optuna

        S = optuna.trial.TrialState
        trials = study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED))
        ok = [t for t in trials if t.state == S.COMPLETE]
        best = max(ok, key=lambda t: t.values[-1], default=None)
        desc = f"{len(ok)} evaluated, {len(trials) - len(ok)} rejected"
        if best is not None:
            flops = ((best.user_attrs.get("vtdsl") or {}).get("cost") or {}).get("flops_ratio")
            desc += f" | best {best.values[-1]:.4f} (trial {best.number}" + (
                f", flops {100 * flops:.1f}%)" if flops is not None else ")")
        self.bar.update(self.task, completed=len(trials), description=desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------
# The search


def search(cfg: SearchConfig, *, progress: bool | None = None, objective=None) -> SearchResult:
    """Run (or resume) a search; write best.vt, trials.json, pareto.png into the output
    directory; return the result. Raises PolicyError for bad input and SearchInterrupted
    (after writing the outputs) on SIGINT."""
    from . import report

    _quiet_optuna()
    if cfg.trials < 0:
        from .objectives import SearchError

        raise SearchError("--trials must be at least 0")
    if objective is None and isinstance(cfg.objective, str):
        from .objectives import OBJECTIVES, PUBLIC, SearchError

        if cfg.objective not in OBJECTIVES:
            from ..lang.errors import did_you_mean

            raise SearchError(f"unknown objective '{cfg.objective}' (expected {' or '.join(PUBLIC)})",
                              hint=did_you_mean(cfg.objective, list(PUBLIC)))
    ctx = _Context(cfg, objective=objective)
    made = ctx.objective  # cheap: a named objective builds its model at the first feasible candidate
    if ctx.objective_name == "accuracy":
        made.setup()  # fail now (exit 2) when vtbench or the trained model is missing
    study_name = cfg.study or default_study_name(cfg, ctx.spec.name, ctx.objective_name)
    out_dir = cfg.out_dir or os.path.join(DEFAULT_OUT, study_name)
    os.makedirs(out_dir, exist_ok=True)
    storage_url = cfg.storage or _sqlite_url(os.path.join(out_dir, "study.db"))

    study = _open_study(ctx, storage_url, study_name, cfg.seed, create=True)
    _check_fingerprint(study, ctx, storage_url)
    _fail_orphans(study)
    done = _finished(study)
    remaining = max(0, cfg.trials - done)
    workers = max(1, min(cfg.workers, remaining)) if remaining else 0
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _Progress(cfg.trials, min(done, cfg.trials), progress and remaining > 0, cfg.pareto)
    interrupted = False
    seed_base = cfg.seed + 7919 * done
    try:
        if workers == 1:
            bar.start()
            study = _open_study(ctx, storage_url, study_name, seed_base, create=False)
            with _INTERRUPTS.installed():
                study.optimize(_Objective(ctx, study), n_trials=remaining, catch=(),
                               callbacks=[lambda s, t: (bar.update(s), _INTERRUPTS.check())])
                _INTERRUPTS.check()
        elif workers > 1:
            _run_workers(cfg, ctx, storage_url, study_name, remaining, workers, seed_base, bar, study)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    _fail_orphans(study, mine=True)
    ran = _finished(study) - done
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None
    result = report.finish(ctx, study, storage_url, out_dir, ran=ran, interrupted=interrupted, log=log)
    if result.interrupted:
        raise SearchInterrupted(result)
    return result


def _run_workers(cfg, ctx, storage_url, study_name, remaining, workers, seed_base, bar, study) -> None:
    import multiprocessing as mp

    # fork where it exists: a worker then starts with the parent's imports and model spec
    # (no second transformers import); nothing here has run torch ops or started threads.
    method = "fork" if sys.platform == "linux" and "fork" in mp.get_all_start_methods() else "spawn"
    spawn = mp.get_context(os.environ.get("VTDSL_SEARCH_START_METHOD", method))
    shares = _split(remaining, workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    backend = getattr(study._storage, "_backend", study._storage)
    if hasattr(backend, "engine"):
        backend.engine.dispose()  # no pooled SQLite connection may cross a fork
    wcfg = dataclasses.replace(cfg, objective=cfg.objective)
    procs = []
    for i, n in enumerate(shares):
        p = spawn.Process(target=_worker_main, name=f"vtdsl-search-{i}",
                          args=(wcfg, storage_url, study_name, n, seed_base + i, os.getpid(), threads))
        p.start()
        procs.append(p)
    bar.start()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            bar.update(study)
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 30
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
            if p.is_alive():
                p.terminate()
                p.join(5)
        raise
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        if 2 in bad:
            from .objectives import SearchError

            raise SearchError("a search worker stopped on bad input (its message is above)")
        print(f"warning: {len(bad)} search worker(s) stopped early (exit codes {bad}); "
              "run the same command again to finish the missing trials", file=sys.stderr)
