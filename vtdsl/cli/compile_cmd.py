"""`vtdsl compile`: install a policy on a model and show what changed where."""

from __future__ import annotations

import json
import os
import time

import click

from .common import EXIT_FAILED, emit_json, guarded
from .run_cmd import TEXT_ENCODER_HELP


def _write(directory: str, manifest: dict, listing: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, default=str)
        fh.write("\n")
    with open(os.path.join(directory, "listing.txt"), "w", encoding="utf-8") as fh:
        fh.write(listing)


@click.command("compile")
@click.argument("policy_file", metavar="POLICY")
@click.option("--model", "model_name", default=None,
              help="Model name (see `vtdsl models`) or a local model directory; default: the policy's "
                   "`model` line.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write manifest.json and listing.txt to this directory.")
@click.option("--weights", type=click.Path(exists=True, file_okay=False), default=None,
              help="Local HF model directory with safetensors weights to load (never runs its code).")
@click.option("--text-tokens", type=click.IntRange(min=0), default=64, show_default=True,
              help="Text (non-image) prompt tokens assumed by the cost report.")
@click.option("--from", "syntax", type=click.Choice(["vt", "yaml"]), default=None,
              help="Policy syntax (default: from the file extension; .vt for stdin).")
@click.option("--text-encoder", "text_encoder", type=click.Path(file_okay=False), default=None,
              help=TEXT_ENCODER_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@guarded
def compile_(policy_file: str, model_name: str | None, out_dir: str | None, weights: str | None, text_tokens: int,
             syntax: str | None, text_encoder: str | None, as_json: bool) -> None:
    """Compile POLICY onto a model: resolve every stage to a module, rewrite the model,
    and report the token counts and the cost.

    Without --weights the model is built on the meta device (architecture only, no
    download). POLICY is a .vt or .yaml file, or '-' for stdin. Exit 0 on success, 1 when
    a `budget` of the policy is exceeded, 2 on bad input.

    \b
    Example:
      vtdsl compile policies/fastv.vt --model llava-1.5-7b -o build/fastv
      vtdsl compile policies/fastv.vt --model tiny-llava --json
    """
    from .. import compiler
    from ..cost import estimate, verdicts
    from .check_cmd import load_plan
    from .run_cmd import load_text_encoder

    plan, text, filename = load_plan(policy_file, model_name, syntax)
    encoder = load_text_encoder(plan, text_encoder, text, filename)
    model, timing = _build_and_compile(plan, weights, encoder)
    report = estimate(plan, text_tokens=text_tokens)
    budgets = verdicts(report, plan.policy.budgets)
    listing = compiler.compiled(model).listing
    manifest = _manifest(plan, model, listing, report, budgets, filename, text, weights, timing)
    cost_lines = "\n".join("  " + line for line in report.summary().splitlines())
    if out_dir:
        _write(out_dir, manifest, listing.text() + "\ncost:\n" + cost_lines + "\n")
    if as_json:
        emit_json(manifest)
    else:
        for diagnostic in plan.diagnostics:
            click.echo(diagnostic.format(text, filename), err=True)
        _echo_summary(manifest, plan.spec, report, budgets, filename, weights, out_dir)
    compiler.uncompile(model)
    if any(not v["ok"] for v in budgets):
        raise SystemExit(EXIT_FAILED)


def _build_and_compile(plan, weights: str | None, text_encoder=None):
    """The model (local weights, or the architecture on the meta device) with the plan
    installed (with `clip_text`'s text encoder, if any), and the seconds each step took."""
    from .. import compiler
    from ..models import load_weights

    spec = plan.spec
    started = time.perf_counter()
    model = load_weights(spec, weights) if weights else spec.build(device="meta")
    built = time.perf_counter()
    compiler.compile(plan, model, spec=spec, text_encoder=text_encoder)
    compiled_s = time.perf_counter() - built
    return model, {"build": round(built - started, 3), "compile": round(compiled_s, 3)}


def _manifest(plan, model, listing, report, budgets: list[dict], filename: str, text: str, weights: str | None,
              timing: dict) -> dict:
    """What `--json` prints and `-o` writes to manifest.json."""
    spec = plan.spec
    return {
        "policy": {"name": plan.policy.name, "file": filename, "source": text},
        "model": {
            "name": spec.name,
            "class": type(model).__name__,
            "weights": os.path.abspath(weights) if weights else None,
            "device": "cpu" if weights else "meta",
        },
        "stages": listing.stages(),
        "visual_tokens": {
            "vit": plan.vit_tokens,
            "projector": plan.projector_tokens,
            "llm": plan.llm_visual,
            "image_placeholders": {"before": spec.image_tokens, "after": plan.image_placeholders},
        },
        **listing.to_json(),
        "cost": report.to_json(),
        "budgets": budgets,
        "warnings": [d.to_json() for d in plan.diagnostics],
        "timing_s": timing,
    }


def _token_range(fewest: int, most: int):
    return most if fewest == most else f"{fewest}..{most}"


def _echo_summary(manifest: dict, spec, report, budgets: list[dict], filename: str, weights: str | None,
                  out_dir: str | None) -> None:
    """The human-readable report: one row per stage, the cost, the budget verdicts."""
    click.echo(f"{filename}: compiled onto {spec.name} ({'weights ' + weights if weights else 'meta device'})")
    click.echo("")
    click.echo(f"{'site':<14} {'module':<44} {'tokens in -> out':>17}")
    for s in manifest["stages"]:
        per = " per crop" if spec.vit_crops > 1 and s["site"].startswith("vit.") else ""
        counts_in = _token_range(s["fewest_in"], s["tokens_in"])
        counts_out = _token_range(s["fewest_out"], s["tokens_out"])
        click.echo(f"{s['site']:<14} {s['module']:<44} {counts_in:>8} -> {counts_out}{per}")
    if not manifest["stages"]:
        click.echo("(no stages: the model is unchanged)")
    click.echo("")
    click.echo(report.summary())
    for v in budgets:
        click.echo(f"budget {v['constraint']}: {'ok' if v['ok'] else 'EXCEEDED'}")
    if out_dir:
        click.echo(f"wrote {os.path.join(out_dir, 'manifest.json')} and {os.path.join(out_dir, 'listing.txt')}")


COMMANDS = [compile_]
