"""Outputs of a search: trials.json, best.vt, the Pareto front (table and PNG), and the
reference points (zoo policies, random and pooling baselines at the best policy's FLOPs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from ..lang.errors import PolicyError
from .storage import redacted


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
    ran: int = 0  # trials finished by this invocation (its worker processes included)
    others: int = 0  # trials other processes finished on the same study meanwhile

    def summary(self) -> dict:
        return {
            "study": self.study, "storage": self.storage, "out_dir": self.out_dir, "model": self.model,
            "objective": self.objective, "budgets": self.budgets, "counts": self.counts, "ran": self.ran,
            "others": self.others,
            "best": self.best, "pareto": self.pareto, "references": self.references, "files": self.files,
            "interrupted": self.interrupted,
        }


def cost_of(report) -> dict:
    return {
        "flops_ratio": report.flops_ratio,
        "flops": report.flops,
        "flops_fastv_ratio": report.fastv_ratio,
        "kv_ratio": report.kv_ratio,
        "visual_tokens": report.visual_tokens_to_llm,
    }


ZOO_DIR = Path(__file__).resolve().parents[2] / "policies"
TRIALS_SCHEMA = 1


# ---------------------------------------------------------------------------------------
# Trials


def collect(study) -> list[dict]:
    """Every trial of the study as a plain dict (the rows of trials.json)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs.get("vtdsl") or {}
        metrics = a.get("metrics")
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "status": a.get("status") or {"FAIL": "failed", "RUNNING": "running"}.get(t.state.name, t.state.name.lower()),
            "params": dict(t.params),
            "point": a.get("point"),
            "policy": a.get("policy"),
            "cost": a.get("cost"),
            "score": metrics.get("score") if metrics else None,
            "metrics": metrics,
            "values": list(t.values) if t.values is not None else None,
            "reason": a.get("reason"),
            "duplicate_of": a.get("duplicate_of"),
            "worker": t.user_attrs.get("worker"),
            "duration_s": round(duration, 4) if duration is not None else None,
            "eval_s": a.get("eval_s"),
        })
    return rows


def evaluated(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["state"] == "COMPLETE" and r["score"] is not None and r["cost"]]


def best_of(rows: list[dict]) -> dict | None:
    """Highest score; ties go to lower FLOPs, then to the earlier trial."""
    ok = evaluated(rows)
    if not ok:
        return None
    return min(ok, key=lambda r: (-r["score"], r["cost"]["flops_ratio"], r["number"]))


def pareto_front(rows: list[dict]) -> list[dict]:
    """Trials no other trial beats on both FLOPs (lower) and score (higher), one per
    policy, by increasing FLOPs."""
    ok = sorted(evaluated(rows), key=lambda r: (r["cost"]["flops_ratio"], -r["score"], r["number"]))
    front: list[dict] = []
    seen: set[str] = set()
    best_score = float("-inf")
    for r in ok:
        if r["score"] > best_score and r["policy"] not in seen:
            front.append(r)
            seen.add(r["policy"])
            best_score = r["score"]
    return front


def counts_of(rows: list[dict]) -> dict:
    out = {"total": len(rows), "finished": 0, "evaluated": 0, "duplicates": 0, "over_budget": 0,
           "invalid": 0, "error": 0, "failed": 0, "running": 0}
    for r in rows:
        if r["state"] in ("COMPLETE", "PRUNED"):
            out["finished"] += 1
        if r["state"] == "COMPLETE":
            out["evaluated"] += 1
            out["duplicates"] += r["duplicate_of"] is not None
        elif r["state"] == "PRUNED":
            key = r["status"] if r["status"] in ("over_budget", "invalid", "error") else "invalid"
            out[key] += 1
        elif r["state"] == "FAIL":
            out["failed"] += 1
        elif r["state"] == "RUNNING":
            out["running"] += 1
    return out


# ---------------------------------------------------------------------------------------
# References


def _zoo_dir(ctx) -> Path:
    return Path(ctx.cfg.zoo_dir) if ctx.cfg.zoo_dir else ZOO_DIR


def _space_budgets(ctx) -> list:
    try:
        return list(ctx.space.base_policy().budgets)
    except PolicyError:  # pragma: no cover - the space was validated
        return []


def _evaluate_reference(ctx, name: str, kind: str, source: str, file: str | None = None) -> dict:
    from ..cost import estimate, verdicts
    from ..ir import check
    from ..lang import format_policy, parse

    from ..ir.rescale import portable

    row: dict[str, Any] = {"name": name, "kind": kind, "file": file}
    try:
        policy = parse(source, file or name)
        # a zoo file written for another model is refused (a row saying so) or, with
        # --rescale, run with its counts and layers mapped onto the searched model
        policy, rescaled = portable(policy, ctx.spec, ctx.cfg.rescale, text=source, filename=file or name)
        plan = check(policy, ctx.spec, source=source, filename=file or name)
    except PolicyError as err:
        row.update(status="invalid", reason=err.message)
        return row
    if rescaled is not None:
        row["rescaled"] = rescaled.to_json()
    report = estimate(plan, text_tokens=ctx.cfg.text_tokens)
    row["policy"] = format_policy(policy.model_copy(update={"name": None, "model": None, "budgets": []}))
    row["cost"] = cost_of(report)
    judged = verdicts(report, _space_budgets(ctx) + list(ctx.budgets))
    row["within_budget"] = all(v["ok"] for v in judged)
    started = time.perf_counter()
    try:
        metrics = ctx.score(plan)
    except PolicyError:
        raise
    except Exception as exc:  # noqa: BLE001 - a reference that cannot run is reported, not fatal
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        return row
    row.update(status="ok", score=metrics["score"], metrics=json.loads(json.dumps(metrics, default=str)),
               eval_s=round(time.perf_counter() - started, 3))
    return row


def _flops(ctx, source: str) -> float | None:
    from ..cost import estimate
    from ..ir import check
    from ..lang import parse

    try:
        return estimate(check(parse(source), ctx.spec), text_tokens=ctx.cfg.text_tokens).flops
    except PolicyError:
        return None


def matched_baselines(ctx, target_flops: float, first_site: str | None = None) -> list[tuple[str, str, str]]:
    """(name, kind, source) of a random and a pooling baseline with FLOPs <= target, at
    `first_site` (the site of the best policy's first stage) when one fits there, else at
    the latest site that fits (vit.out, then ViT layers from the last down); with the
    most tokens that fit there (random: the largest count; pool: the smallest window)."""
    spec = ctx.spec
    sites = ["vit.out"] + [f"vit.layer{i}" for i in range(spec.vit.layers - 1, 0, -1)]
    if first_site:
        sites = [first_site] + [s for s in sites if s != first_site]
    out = []
    for site in sites:  # random: largest K at the latest site that fits
        if (f := _flops(ctx, f"at {site} keep random 0")) is None or f > target_flops:
            continue
        lo, hi = 0, spec.patch_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            f = _flops(ctx, f"at {site} keep random {mid}")
            if f is not None and f <= target_flops:
                lo = mid
            else:
                hi = mid - 1
        out.append((f"random-{lo}@{site}", "random", f"at {site} keep random {lo}"))
        break
    rows, cols = spec.grid
    for site in sites:  # pool: smallest window at the latest site that fits
        found = None
        for r in range(2, min(rows, cols, 64) + 1):
            f = _flops(ctx, f"at {site} pool {r}x{r}")
            if f is not None and f <= target_flops:
                found = r
                break
        if found:
            out.append((f"pool-{found}x{found}@{site}", "pool", f"at {site} pool {found}x{found}"))
            break
    return out


def reference_jobs(ctx, best: dict | None) -> list[tuple[str, str, str, str | None]]:
    """(name, kind, source, file) of every reference: the unpruned model, the zoo
    policies, and random / pooling baselines at the best policy's FLOPs."""
    jobs: list[tuple[str, str, str, str | None]] = [("unpruned", "unpruned", "", None)]
    zoo = _zoo_dir(ctx)
    for path in sorted(zoo.glob("*.vt")) if zoo.is_dir() else []:
        jobs.append((path.stem, "zoo", path.read_text(encoding="utf-8"), str(path)))
    if best is not None:
        first = next((line.split()[1] for line in (best["policy"] or "").splitlines() if line.startswith("at ")), None)
        for name, kind, source in matched_baselines(ctx, best["cost"]["flops"], first):
            jobs.append((name, kind, source, None))
    return jobs


def references(ctx, best: dict | None, step=None) -> list[dict]:
    """Every reference of `reference_jobs`, scored by the search's objective;
    `step(done, total, name)` is called before each (a progress display)."""
    jobs = reference_jobs(ctx, best)
    rows = []
    for i, (name, kind, source, file) in enumerate(jobs):
        if step is not None:
            step(i, len(jobs), name)
        rows.append(_evaluate_reference(ctx, name, kind, source, file))
    if step is not None:
        step(len(jobs), len(jobs), "")
    return rows


@contextlib.contextmanager
def _reference_bar(log):
    """A progress bar on stderr for the reference scoring (each can take a model run);
    yields its `step` callback, or None when progress is off."""
    if log is None:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    log("scoring the reference policies (zoo, random and pooling baselines); --no-references skips this")
    bar = Progress(TextColumn("references"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), transient=False)
    task = bar.add_task("", total=None)

    def step(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, description=name)

    with bar:
        yield step


# ---------------------------------------------------------------------------------------
# Files


def best_policy_text(ctx, best: dict, study_name: str, n_finished: int) -> str:
    """Canonical `.vt` text of the best policy with its model and budget lines and a
    comment header (cost, score); `vtdsl fmt --check` accepts it."""
    from ..cost import parse_budget
    from ..lang import format_policy, format_source, parse

    policy = parse(best["policy"])
    budgets = list(policy.budgets)
    have = {(b.metric, b.op, b.value, b.percent) for b in budgets}
    for text in ctx.cfg.budgets:
        b = parse_budget(text)
        if (b.metric, b.op, b.value, b.percent) not in have:
            budgets.append(b)
    policy = policy.model_copy(update={"model": policy.model or ctx.spec.name, "budgets": budgets})
    c = best["cost"]
    m = best["metrics"] or {}
    extras = ", ".join(f"{k} {_num(v)}" for k, v in m.items() if k != "score" and isinstance(v, (int, float)))
    header = [
        f"# Best of {n_finished} trials of vtdsl search (study {study_name}), trial {best['number']}.",
        f"# Objective {ctx.objective_name}: score {_num(best['score'])}" + (f" ({extras})" if extras else "") + ".",
        f"# Cost on {ctx.spec.name}: FLOPs {100 * c['flops_ratio']:.2f}% of unpruned ({c['flops']:,} per image), "
        f"KV cache {100 * c['kv_ratio']:.2f}%, {c['visual_tokens']} visual tokens into the LLM.",
        f"# Space: {os.path.basename(ctx.space.filename)}; point {best.get('point')}: "
        + " ".join(f"{k}={v}" for k, v in best["params"].items()),
    ]
    text = "\n".join(header) + "\n" + format_policy(policy)
    return format_source(text)


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def pareto_table(front: list[dict], refs: list[dict] | None = None) -> str:
    lines = ["| trial | FLOPs | score | tokens | policy |", "|---:|---:|---:|---:|---|"]
    for r in front:
        policy = " ; ".join(line for line in (r["policy"] or "").splitlines() if line.startswith("at "))
        lines.append(f"| {r['number']} | {100 * r['cost']['flops_ratio']:.2f}% | {r['score']:.4f} | "
                     f"{r['cost']['visual_tokens']} | `{policy or '(unpruned)'}` |")
    if refs:
        ok = [r for r in refs if r.get("status") == "ok"]
        if ok:
            lines += ["", "| reference | FLOPs | score | tokens | within budget |", "|---|---:|---:|---:|:---:|"]
            for r in sorted(ok, key=lambda r: r["cost"]["flops_ratio"]):
                scaled = r.get("rescaled")
                name = r["name"] + (f" (rescaled from {scaled['from']})" if scaled else "")
                lines.append(f"| {name} | {100 * r['cost']['flops_ratio']:.2f}% | {r['score']:.4f} | "
                             f"{r['cost']['visual_tokens']} | {'yes' if r['within_budget'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict], front: list[dict], refs: list[dict], best: dict | None, title: str,
         budget_flops: float | None, score_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    ok = evaluated(rows)
    if ok:
        ax.scatter([100 * r["cost"]["flops_ratio"] for r in ok], [r["score"] for r in ok], s=14, c="0.7",
                   label=f"trials ({len(ok)})", zorder=1)
    if front:
        ax.plot([100 * r["cost"]["flops_ratio"] for r in front], [r["score"] for r in front], "-o", c="tab:red",
                ms=5, lw=1.5, label="Pareto front", zorder=3, drawstyle="steps-post")
    if best is not None:
        ax.scatter([100 * best["cost"]["flops_ratio"]], [best["score"]], marker="*", s=220, c="gold",
                   edgecolors="k", label="best", zorder=4)
    styles = {"zoo": ("^", "tab:blue"), "random": ("s", "tab:green"), "pool": ("D", "tab:orange"),
              "unpruned": ("X", "k")}
    for kind, (marker, color) in styles.items():
        pts = [r for r in refs if r["kind"] == kind and r.get("status") == "ok"]
        if not pts:
            continue
        ax.scatter([100 * r["cost"]["flops_ratio"] for r in pts], [r["score"] for r in pts], marker=marker, c=color,
                   s=36, label=kind if kind != "zoo" else f"zoo ({len(pts)})", zorder=2, alpha=0.85)
        if kind != "zoo":
            for r in pts:
                ax.annotate(r["name"], (100 * r["cost"]["flops_ratio"], r["score"]), fontsize=7,
                            xytext=(5, -11 if kind == "pool" else 4), textcoords="offset points")
    if budget_flops is not None:
        ax.axvline(budget_flops, ls="--", c="0.4", lw=1, label=f"budget {budget_flops:g}%")
    ax.set_xlabel("FLOPs (% of the unpruned model)")
    ax.set_ylabel(score_name)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = f"{path}.{os.getpid()}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _flops_budget(ctx) -> float | None:
    values = [b.value for b in _space_budgets(ctx) + list(ctx.budgets) if b.metric == "flops" and b.percent]
    return min(values) if values else None


def finish(ctx, study, storage_url: str, out_dir: str, *, ran: int, interrupted: bool, log=None):
    """Collect the study, evaluate the references, write every output file. An
    interrupt while the references are scored skips them (the outputs are still written)."""
    rows = collect(study)
    counts = counts_of(rows)
    best = best_of(rows)
    front = pareto_front(rows)
    refs: list[dict] = []
    if ctx.cfg.references and not interrupted and best is not None:
        try:
            with _reference_bar(log) as step:
                refs = references(ctx, best, step)
        except KeyboardInterrupt:
            refs, interrupted = [], True
    files: dict[str, str] = {}
    os.makedirs(out_dir, exist_ok=True)
    if best is not None:
        files["best"] = os.path.join(out_dir, "best.vt")
        _write(files["best"], best_policy_text(ctx, best, study.study_name, counts["finished"]))
    payload = {
        "schema": TRIALS_SCHEMA,
        "study": study.study_name,
        "storage": redacted(storage_url),
        "space": {"file": ctx.space.filename, "count": str(ctx.space.count) if ctx.space.count > 2**53 else ctx.space.count,
                  "holes": ctx.space.describe()},
        "model": ctx.spec.name,
        "objective": ctx.objective_name,
        "directions": ["minimize flops_ratio", "maximize score"] if ctx.cfg.pareto else ["maximize score"],
        "budgets": [_budget_str(b) for b in _space_budgets(ctx) + list(ctx.budgets)],
        "counts": counts,
        "best": best,
        "pareto": [r["number"] for r in front],
        "references": refs,
        "trials": rows,
    }
    files["trials"] = os.path.join(out_dir, "trials.json")
    _write(files["trials"], json.dumps(payload, indent=2, default=str) + "\n")
    if front:
        files["pareto_table"] = os.path.join(out_dir, "pareto.md")
        _write(files["pareto_table"], pareto_table(front, refs))
    if evaluated(rows):
        files["plot"] = os.path.join(out_dir, "pareto.png")
        title = f"{study.study_name}: {ctx.objective_name} vs FLOPs on {ctx.spec.name}"
        plot(files["plot"], rows, front, refs, best, title, _flops_budget(ctx), ctx.objective_name)
    return SearchResult(study=study.study_name, storage=redacted(storage_url), out_dir=out_dir, model=ctx.spec.name,
                        objective=ctx.objective_name, budgets=payload["budgets"], trials=rows, best=best,
                        pareto=front, references=refs, counts=counts, files=files, interrupted=interrupted,
                        ran=ran)


def _budget_str(b) -> str:
    from ..cost import budget_text

    return budget_text(b)


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # processes sharing a study may write the same outputs at once
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
