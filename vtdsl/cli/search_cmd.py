"""`vtdsl space` (inspect a policy space) and `vtdsl search` (budget search over it)."""

from __future__ import annotations

import os
import signal
import sys

import click

from .common import EXIT_BAD_INPUT, EXIT_FAILED, emit_json, guarded


def _load(space_file: str, syntax: str | None):
    from ..lang.source import decode, read_bytes
    from ..search.space import parse_space, syntax_of

    if space_file == "-":
        data = sys.stdin.buffer.read((1 << 20) + 1)
        filename, syntax = "<stdin>", syntax or "vt"
    else:
        filename = space_file
        syntax = syntax or syntax_of(space_file)
        data = read_bytes(space_file)
    return parse_space(decode(data, filename), filename, syntax)


def _show_value(v) -> str:
    if v is None:
        return "(absent)"
    if v is True:
        return "(present)"
    if v is False:
        return "(absent)"
    return str(v)


# ---------------------------------------------------------------------------------------
# vtdsl space


@click.command("space")
@click.argument("space_file", metavar="SPACE")
@click.option("--count", "count_only", is_flag=True, help="Print the number of points only.")
@click.option("--sample", "sample", type=click.IntRange(min=0), default=None, metavar="N",
              help="Print N distinct points drawn uniformly, as canonical policies.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@click.option("--from", "syntax", type=click.Choice(["vt", "yaml"]), default=None,
              help="Space syntax (default: from the extension: .vts/.vt or .yaml/.yml; .vt for stdin).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def space_(space_file: str, count_only: bool, sample: int | None, seed: int, syntax: str | None, as_json: bool) -> None:
    """Inspect a policy SPACE: a policy with holes (docs/search.md).

    Without options, prints the number of points and every hole (its parameter name,
    line:column, and its items). Holes: {a, b, c} or {a | b | c} (choices, may nest),
    {8..20} / {8..20 step 4} (ranges), {...}? (optional piece), `at?` (optional stage).
    Exit 0 ok, 2 for a bad space (located error).

    \b
    Example:
      vtdsl space examples/design.vts --count
      vtdsl space examples/design.vts --sample 3 --seed 1
    """
    space = _load(space_file, syntax)
    if count_only and sample is None:
        if as_json:
            emit_json({"space": space.filename, "count": space.count})
        else:
            click.echo(str(space.count))
        return
    payload: dict = {"space": space.filename, "count": space.count, "holes": space.describe()}
    samples = []
    if sample is not None:
        if sample > space.count:
            click.echo(f"note: the space has only {space.count} point{'s' if space.count != 1 else ''}; "
                       "printing all of them", err=True)
        for index, point in space.sample(sample, seed):
            samples.append({"index": index, "params": point, "policy": space.candidate(point).text})
        payload["samples"] = samples
    if as_json:
        emit_json(payload)
        return
    if sample is not None:
        for i, s in enumerate(samples):
            params = " ".join(f"{k}={_show_value(v)}" for k, v in s["params"].items())
            if i:
                click.echo("")
            click.echo(f"# sample {i + 1}/{len(samples)}: point {s['index']} of {space.count}"
                       + (f": {params}" if params else ""))
            click.echo(s["policy"], nl=False)
        return
    click.echo(f"{space.filename}: {space.count} point{'s' if space.count != 1 else ''}, "
               f"{len(space.holes)} hole{'s' if len(space.holes) != 1 else ''}")
    for h in payload["holes"]:
        items = []
        for it in h["items"]:
            if "range" in it:
                lo, hi = it["range"]
                items.append(f"{lo}..{hi}" + (f" step {it['step']}" if it["step"] != 1 else ""))
            else:
                items.append(" ".join(it["text"].split()))
        if h["optional"] and h["kind"] != "optional stage":
            items.append("(absent)")
        shown = " | ".join(items) if h["kind"] != "optional stage" else "present | absent"
        click.echo(f"  {h['name']:<8} {h['kind']:<15} {h['count']:>6}  {shown}")


# ---------------------------------------------------------------------------------------
# vtdsl search


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (tests calling the command in a thread)
        pass


def _fail(err) -> None:
    click.echo(err.format(), err=True)
    sys.exit(EXIT_BAD_INPUT)


def _render_result(result, cfg) -> str:
    from ..search.report import pareto_table

    c = result.counts
    by = f"{result.ran} in this run" + (f", {result.others} by other processes" if result.others else "")
    lines = [f"study {result.study}: {c['finished']} finished trials ({by}): "
             f"{c['evaluated']} evaluated ({c['duplicates']} repeats), {c['over_budget']} over budget, "
             f"{c['invalid']} invalid, {c['error']} errors"
             + (f", {c['failed']} failed" if c["failed"] else "")]
    lines.append(f"model {result.model}, objective {result.objective}"
                 + (f", budget {' and '.join(result.budgets)}" if result.budgets else ", no budget"))
    b = result.best
    if b is None:
        lines.append("no candidate within budget was evaluated")
    else:
        lines.append("")
        lines.append(f"best: trial {b['number']}, score {b['score']:.4f}, FLOPs {100 * b['cost']['flops_ratio']:.2f}%, "
                     f"{b['cost']['visual_tokens']} visual tokens")
        for line in b["policy"].splitlines():
            lines.append("  " + line)
    if result.pareto:
        lines.append("")
        lines.append("Pareto front (FLOPs vs score):")
        lines.append(pareto_table(result.pareto, result.references).rstrip())
    if result.files:
        lines.append("")
        lines.append("wrote " + ", ".join(result.files[k] for k in ("best", "trials", "pareto_table", "plot")
                                          if k in result.files))
    return "\n".join(lines)


def _resume_hint(result) -> str:
    argv = [a for a in sys.argv[1:]]
    cmd = "vtdsl " + " ".join(_quote(a) for a in argv)
    if "--study" not in argv:
        cmd += f" --study {result.study}"
    return f"resume with: {cmd}"


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


@click.command("search")
@click.argument("space_file", metavar="SPACE")
@click.option("--model", "-m", default=None, help="Model name (see `vtdsl models`); default: the space's model line.")
@click.option("--budget", "budgets", multiple=True, metavar="EXPR",
              help='Budget every candidate must meet, e.g. "flops <= 25%". Repeatable; adds to the space\'s '
                   "budget lines.")
@click.option("--objective", default="agreement", show_default=True, metavar="NAME",
              help="agreement (next-token agreement with the unpruned model, any model) or accuracy "
                   "(vtbench: tiny-llava-vtbench2, or v1's tiny-llava-vtbench).")
@click.option("--trials", type=click.IntRange(min=0), default=50, show_default=True,
              help="Finished trials (evaluated or rejected) the study should hold; a resumed study runs the rest.")
@click.option("--study", default=None, help="Study name (default: SPACE-MODEL-OBJECTIVE); rerun with it to resume.")
@click.option("--storage", default=None, metavar="URL",
              help="Where the study lives (default: sqlite:///DIR/study.db): sqlite:///PATH, or "
                   "postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DB for a team of processes on several machines.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes sharing the study (more may join from anywhere with the same --storage).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed.")
@click.option("--pareto", is_flag=True, help="NSGA-II on (FLOPs, score) instead of TPE on the score.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: out/search/STUDY).")
@click.option("--references/--no-references", default=True, show_default=True,
              help="Also score the zoo policies and random / pooling baselines at the best policy's FLOPs.")
@click.option("--rescale", is_flag=True,
              help="Score zoo policies written for another model with their counts scaled by the visual-token "
                   "ratio and their layers by relative depth (docs/language.md); without it they are listed as "
                   "refused.")
@click.option("--weights", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local model directory with safetensors weights (default: random weights, seed 0).")
@click.option("--prompts", type=click.IntRange(min=1), default=4, show_default=True,
              help="Calibration prompts for the agreement objective.")
@click.option("--examples", type=click.IntRange(min=1), default=256, show_default=True,
              help="vtbench validation examples for the accuracy objective (with --data: the first N lines).")
@click.option("--data", "data_file", type=click.Path(dir_okay=False), default=None,
              help="Accuracy objective on your own JSONL examples (as `vtdsl eval --data`), with the model in "
                   "--weights (default: the searched model's own weights).")
@click.option("--text-tokens", type=click.IntRange(min=0), default=64, show_default=True,
              help="Text tokens assumed by the cost model.")
@click.option("--from", "syntax", type=click.Choice(["vt", "yaml"]), default=None, help="Space syntax.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: on a terminal).")
@click.option("--verbose", is_flag=True, help="Also show the libraries' own output (transformers' weight-loading bars).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@guarded
def search_(space_file, model, budgets, objective, trials, study, storage, workers, seed, pareto, out_dir,
            references, rescale, weights, prompts, examples, data_file, text_tokens, syntax, progress, verbose,
            as_json) -> None:
    """Search a policy SPACE for the best policy within a budget.

    Every candidate is checked and costed by the cost model first; invalid and
    over-budget ones are rejected without running the model. The rest are scored by the
    objective. The study lives in SQLite (DIR/study.db) unless --storage says otherwise:
    a killed search resumes with the same command (or --study NAME), keeping every
    finished trial. Processes started with the same --storage and --study share the
    study and stop together when it holds --trials finished trials. Writes DIR/best.vt
    (canonical, cost and score in its header), DIR/trials.json, DIR/pareto.md and
    DIR/pareto.png.

    Exit 0 ok, 1 when no candidate within budget was found, 2 for bad input, 130 when
    interrupted (the finished trials are kept and the outputs written).

    \b
    Example:
      vtdsl search examples/design.vts --model tiny-llava --budget "flops <= 30%" --trials 40
      vtdsl search examples/design.vts --model tiny-llava --budget "flops <= 30%" --pareto -o out/d
    """
    from ..lang.errors import did_you_mean
    from ..search.objectives import OBJECTIVES, PUBLIC, SearchError
    from ..search.run import SearchConfig, SearchInterrupted, search

    if objective not in OBJECTIVES:
        _fail(SearchError(f"unknown objective '{objective}' (expected {' or '.join(PUBLIC)})",
                          hint=did_you_mean(objective, list(PUBLIC))))
    options = {"prompts": prompts} if objective == "agreement" else {}
    if objective == "accuracy":
        options = {"examples": examples}
        if data_file is not None:
            options["data"] = os.path.abspath(data_file)
    elif data_file is not None:
        raise click.UsageError("--data is for --objective accuracy")
    cfg = SearchConfig(space=space_file, model=model, budgets=list(budgets), objective=objective,
                       objective_options=options, trials=trials, study=study, storage=storage, out_dir=out_dir,
                       workers=workers, seed=seed, pareto=pareto, references=references, rescale=rescale,
                       text_tokens=text_tokens,
                       syntax=syntax, weights=weights, verbose=verbose)
    _sigterm_as_interrupt()
    try:
        result = search(cfg, progress=progress)
    except SearchError as err:
        _fail(err)
    except SearchInterrupted as stop:
        result = stop.result
        if as_json:
            emit_json(result.summary())
        else:
            click.echo(_render_result(result, cfg))
        click.echo(f"interrupted: {result.counts['finished']} finished trials are kept in {result.storage}", err=True)
        click.echo(_resume_hint(result), err=True)
        sys.exit(130)
    if as_json:
        emit_json(result.summary())
    else:
        click.echo(_render_result(result, cfg))
    if result.counts["finished"] < trials:
        click.echo(f"note: {result.counts['finished']} of {trials} trials finished; " + _resume_hint(result), err=True)
    sys.exit(0 if result.best is not None else EXIT_FAILED)


COMMANDS = [space_, search_]
