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
reuses its score (`duplicate_of`); one that another process is scoring right now is
waited for, then reused, so no policy is scored twice.

Samplers: TPE (one objective, maximised) or NSGA-II (`pareto=True`: minimise the FLOPs
ratio, maximise the score). `trials` is the number of *finished* trials (complete or
pruned) the study should hold, whoever runs them: every process starts a trial only
after claiming a free slot under the study's lock (`storage.StudyLock`), so any number
of processes (`workers` local ones, or independent `vtdsl search` runs on one storage
URL) stop together at exactly `trials`. A process whose slots are all claimed by others
waits for them, and takes over the slot of one that dies. Storage: SQLite `DIR/study.db`
by default, or a URL `storage.resolve` accepts (PostgreSQL through psycopg). Trials left
RUNNING by a killed search are marked FAIL (their process is gone), so a study only ever
holds finished trials and failed ones.
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
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

from ..lang.errors import PolicyError
from .report import SearchResult, cost_of
from .storage import StudyLock, open_storage, redacted, resolve, storage_errors

__all__ = ["SearchConfig", "SearchInterrupted", "SearchResult", "open_storage", "search"]

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
    # zoo references written for another model: rescaled (vtdsl.ir.rescale) instead of refused
    rescale: bool = False
    text_tokens: int = 64
    syntax: str | None = None
    weights: str | None = None
    verbose: bool = False  # show transformers' own loading bars


# ---------------------------------------------------------------------------------------
# Set-up shared by the main process and the workers


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*heartbeat.*")


def _quiet_model_loading() -> None:
    """No "Loading weights" bar per model load (a search loads a model in every worker);
    the search's own progress says what is happening."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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


def _sampler(cfg: SearchConfig, seed: int):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.pareto:
            population = max(4, min(50, cfg.trials // 4))
            return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
        # constant_liar: a trial another process is running counts as a poor result, so
        # concurrent processes are steered away from the point it is evaluating
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=max(2, min(10, cfg.trials // 4)))


def _directions(cfg: SearchConfig) -> list[str]:
    return ["minimize", "maximize"] if cfg.pareto else ["maximize"]


def _parse_budgets(texts: list[str]):
    from ..cost import parse_budget

    return [parse_budget(t) for t in texts]


def _same_model_as_written(space, spec) -> None:
    """A space whose `model` line names a model of other counts is refused, located: its
    token counts and layers would mean another budget on `spec` (issue 22 item 6)."""
    from ..ir.rescale import same_counts
    from .objectives import SearchError

    base = space.base_policy()
    if not base.model:
        return
    written = resolve_spec(base.model)
    if written.name != spec.name and not same_counts(written, spec):
        span = base.model_span or base.span
        where = f"{space.filename}:{span.line}:{span.column}: " if span else f"{space.filename}: "
        raise SearchError(f"{where}the space was written for model '{written.name}' ({written.image_tokens} visual "
                          f"tokens, {written.vit.layers}/{written.llm.layers} layers) but would search "
                          f"'{spec.name}' ({spec.image_tokens}, {spec.vit.layers}/{spec.llm.layers})",
                          hint=f"search it with --model {written.name}, or write the space for {spec.name} "
                               "(--rescale maps the zoo references, not a space)")


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
        _same_model_as_written(self.space, self.spec)
        if not cfg.verbose:
            _quiet_model_loading()
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
    """The optuna objective of one process.

    Called with the study lock held (the trial loop takes it to claim a slot): the trial
    is tagged with its process and run while no other process can look at it half-made,
    and the lock is released once the trial knows whether it scores its policy, reuses a
    stored score, or is rejected.
    """

    def __init__(self, ctx: _Context, study, lock: StudyLock, run_id: str):
        self.ctx = ctx
        self.study = study
        self.lock = lock
        self.run_id = run_id
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

    def _scorer_of(self, policy: str, mine: int):
        """The running trial (of any process) that is scoring `policy`, if one is."""
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number != mine and t.user_attrs.get("scoring") == policy:
                return t
        return None

    def _reuse_or_claim(self, trial, policy: str) -> dict | None:
        """The stored result of `policy`, or None once this trial is marked as the one
        scoring it. While another live trial scores it, waits (lock released) for it."""
        while True:
            self.lock.acquire()
            try:
                hit = self._lookup(policy)
                other = None if hit is not None else self._scorer_of(policy, trial.number)
                if hit is None and other is None:
                    trial.set_user_attr("scoring", policy)
            finally:
                self.lock.release()
            if other is None:
                return hit
            _await_trial(self.study, self.lock, other)

    def _score(self, trial, info: dict, record: dict) -> dict:
        import optuna

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
        return metrics

    def __call__(self, trial):
        import optuna

        try:
            trial.set_user_attr("worker", self.worker)
            trial.set_user_attr("run", self.run_id)
            _INTERRUPTS.check()
            started = time.perf_counter()
            point = self.ctx.space.suggest(trial)
            info = self.ctx.assess(point)
        finally:
            self.lock.release()
        record: dict[str, Any] = {"point": self.ctx.space.index(point), "policy": info.get("policy"),
                                  "cost": info.get("cost"), "status": info["status"]}
        if info["status"] != "ok":
            record["reason"] = info["reason"]
            trial.set_user_attr("vtdsl", _jsonable(record))
            raise optuna.TrialPruned(info["reason"])
        hit = self._reuse_or_claim(trial, info["policy"])
        if hit is not None:
            metrics = hit["metrics"]
            record["duplicate_of"] = hit["number"]
        else:
            metrics = self._score(trial, info, record)
        record["metrics"] = metrics
        record["eval_s"] = round(time.perf_counter() - started, 4)
        trial.set_user_attr("vtdsl", _jsonable(record))
        score = float(metrics["score"])
        if self.ctx.cfg.pareto:
            return info["cost"]["flops_ratio"], score
        return score


def _await_trial(study, lock: StudyLock, other) -> None:
    """Wait until another process's trial is no longer RUNNING: it finished, or its
    process died and it was marked FAIL (here, when that process ran on this host)."""
    import optuna

    polls = 0
    while study._storage.get_trial(other._trial_id).state == optuna.trial.TrialState.RUNNING:
        _INTERRUPTS.check()
        time.sleep(0.1)
        polls += 1
        if polls % 20 == 0:
            with lock:
                _fail_orphans(study)
            _fail_stale(study)


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


def _ran_by(study, run_id: str) -> int:
    """Finished trials of one invocation (its worker processes included)."""
    import optuna

    S = optuna.trial.TrialState
    return sum(t.user_attrs.get("run") == run_id for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED)))


def _fail_stale(study) -> None:
    """Fail the trials whose process, on any host, stopped its heartbeat (grace 60 s)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)


def _open_study(ctx: _Context, storage_url: str, study_name: str, seed: int, create: bool):
    import optuna

    storage = open_storage(storage_url)
    sampler = _sampler(ctx.cfg, seed)
    with storage_errors(storage_url):
        if create:  # a concurrent creation of the same study is loaded, not an error
            return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                       directions=_directions(ctx.cfg), load_if_exists=True)
        return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)


def _join_study(ctx: _Context, storage_url: str, study_name: str, lock: StudyLock):
    """Open (or create) the study; under its lock, check that it was made for this search
    and fail the trials of processes that are gone. Returns it and its finished trials."""
    study = _open_study(ctx, storage_url, study_name, ctx.cfg.seed, create=True)
    with storage_errors(storage_url), lock:
        _check_fingerprint(study, ctx, storage_url)
        _fail_orphans(study)
        done = _finished(study)
    return study, done


def _check_fingerprint(study, ctx: _Context, storage_url: str) -> None:
    mine = ctx.fingerprint()
    theirs = study.user_attrs.get("vtdsl")
    if theirs is None:
        if study.get_trials(deepcopy=False):
            from .objectives import SearchError

            raise SearchError(f"study '{study.study_name}' in {redacted(storage_url)} was not made by vtdsl search",
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
# The trial loop


def _slots(study, total: int) -> tuple[str, int]:
    """Under the study lock: "full" when the study holds `total` finished trials, "wait"
    when live processes are running the rest, else "free"; and the next trial's number."""
    import optuna

    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state in (S.COMPLETE, S.PRUNED) for t in trials)
    running = sum(t.state == S.RUNNING for t in trials)
    if finished >= total:
        return "full", len(trials)
    return ("wait" if finished + running >= total else "free"), len(trials)


def _run_trials(ctx: _Context, study, lock: StudyLock, *, total: int, cap: int, run_id: str,
                on_step: Callable | None = None) -> int:
    """Run trials until the study holds `total` finished ones (by any process) or this
    process has run `cap`; return how many it ran.

    A slot is claimed and its trial created under the study lock, so concurrent processes
    never start more than `total` trials between them. The sampler is reseeded from the
    trial's number: processes that start together with one --seed explore different
    points, and a rerun of a study replays it.
    """
    objective = _Objective(ctx, study, lock, run_id)
    ran = 0
    while ran < cap:
        _INTERRUPTS.check()
        lock.acquire()
        try:
            _fail_orphans(study)
            state, number = _slots(study, total)
            if state == "free":
                study.sampler = _sampler(ctx.cfg, ctx.cfg.seed + 7919 * number)
                study.optimize(objective, n_trials=1, catch=())  # the objective releases the lock
                ran += 1
        finally:
            lock.release()
        if state == "full":
            break
        if on_step is not None:
            on_step(study)
        if state == "wait":
            _pause(study)
    return ran


def _pause(study) -> None:
    """Every slot left is another process's running trial: give them time to finish (or
    to be found dead, by pid here or by heartbeat elsewhere, freeing the slot)."""
    _fail_stale(study)
    for _ in range(5):
        _INTERRUPTS.check()
        time.sleep(0.1)


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


def _worker_main(cfg: SearchConfig, storage_url: str, study_name: str, n_trials: int, parent: int,
                 threads: int, run_id: str) -> None:
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
        study = _open_study(ctx, storage_url, study_name, cfg.seed, create=False)
        with _INTERRUPTS.installed():
            _run_trials(ctx, study, StudyLock(storage_url, study_name), total=cfg.trials, cap=n_trials,
                        run_id=run_id)
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
    """Run (or resume, or join) a search; write best.vt, trials.json, pareto.png into the
    output directory; return the result. Raises PolicyError or SearchError for bad input
    and SearchInterrupted (after writing the outputs) on SIGINT."""
    from . import report

    _quiet_optuna()
    _check_request(cfg, objective)
    given = resolve(cfg.storage) if cfg.storage else None  # a bad URL fails before any model is built
    ctx = _Context(cfg, objective=objective)
    made = ctx.objective  # cheap: a named objective builds its model at the first feasible candidate
    if ctx.objective_name == "accuracy":
        made.setup()  # fail now (exit 2) when vtbench or the trained model is missing
    study_name = cfg.study or default_study_name(cfg, ctx.spec.name, ctx.objective_name)
    out_dir = cfg.out_dir or os.path.join(DEFAULT_OUT, study_name)
    os.makedirs(out_dir, exist_ok=True)
    storage_url = given or resolve(_sqlite_url(os.path.join(out_dir, "study.db")))
    lock = StudyLock(storage_url, study_name)
    study, done = _join_study(ctx, storage_url, study_name, lock)
    remaining = max(0, cfg.trials - done)
    workers = max(1, min(cfg.workers, remaining)) if remaining else 0
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _Progress(cfg.trials, min(done, cfg.trials), progress and remaining > 0, cfg.pareto)
    run_id = uuid.uuid4().hex
    interrupted = False
    try:
        if workers == 1:
            bar.start()
            with _INTERRUPTS.installed():
                _run_trials(ctx, study, lock, total=cfg.trials, cap=remaining, run_id=run_id, on_step=bar.update)
                _INTERRUPTS.check()
        elif workers > 1:
            _run_workers(cfg, ctx, storage_url, study_name, remaining, workers, run_id, bar, study)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    with lock:
        _fail_orphans(study, mine=True)
    ran = _ran_by(study, run_id)
    others = max(0, _finished(study) - done - ran)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else None
    result = report.finish(ctx, study, storage_url, out_dir, ran=ran, interrupted=interrupted, log=log)
    result.others = others
    if result.interrupted:
        raise SearchInterrupted(result)
    return result


def _check_request(cfg: SearchConfig, objective) -> None:
    from .objectives import OBJECTIVES, PUBLIC, SearchError

    if cfg.trials < 0:
        raise SearchError("--trials must be at least 0")
    if objective is None and isinstance(cfg.objective, str) and cfg.objective not in OBJECTIVES:
        from ..lang.errors import did_you_mean

        raise SearchError(f"unknown objective '{cfg.objective}' (expected {' or '.join(PUBLIC)})",
                          hint=did_you_mean(cfg.objective, list(PUBLIC)))


def _run_workers(cfg, ctx, storage_url, study_name, remaining, workers, run_id, bar, study) -> None:
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
                          args=(wcfg, storage_url, study_name, n, os.getpid(), threads, run_id))
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
