"""`vtdsl eval`: policies side by side on vtbench with the tiny trained LLaVA."""

from __future__ import annotations

import os

import click

from .common import emit_json, guarded
from .run_cmd import weight_options

MODEL_HELP = ("tiny-llava-vtbench2 (vtbench v2), tiny-llava-vtbench (v1; both package data) or a directory written "
              "by examples/train_tiny_vlm2.py / train_tiny_vlm.py; its input size picks the benchmark (192 / 96 px).")


@click.command("eval")
@click.argument("policy_files", metavar="POLICY...", nargs=-1, required=True)
@click.option("-m", "--model", "model_name", default="tiny-llava-vtbench", show_default=True,
              help=MODEL_HELP)
@click.option("--data", "data_file", type=click.Path(dir_okay=False), default=None,
              help="Your own examples instead of vtbench: a JSONL file, one {image, question, answer, tag} per line "
                   "(image paths relative to the file; answer a string or a list).")
@click.option("--weights", default=None,
              help="With --data: a shipped vtbench model or a local HF model directory of any registered family "
                   "(default: --model).")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True,
              help="vtbench split (never train or search on test).")
@click.option("-n", "--n", "n", type=click.IntRange(min=1, max=100_000), default=None,
              help="Examples: the first N of the split (default 500; families round-robin) or of --data (default all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Examples per forward (default 50 on vtbench, 16 with --data).")
@click.option("--max-new-tokens", type=click.IntRange(min=1, max=4096), default=None,
              help="With --data: longest answer (default 1 for a vtbench-trained model, 32 otherwise).")
@weight_options
@click.option("--baselines", is_flag=True,
              help="Add a random and a pooling policy (at vit.out) keeping as many visual tokens as each "
                   "policy keeps to the end of the LLM.")
@click.option("--rescale", is_flag=True,
              help="Run a policy written for another model (its `model` line) with its counts scaled by the "
                   "visual-token ratio and its layers by relative depth (docs/language.md); without it such a "
                   "policy is refused.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def eval_(policy_files: tuple[str, ...], model_name: str, data_file: str | None, weights: str | None, split: str,
          n: int | None, batch_size: int | None, max_new_tokens: int | None, dtype: str, device: str,
          baselines: bool, rescale: bool, as_json: bool) -> None:
    """Evaluate POLICY... and the unpruned model on the same examples: accuracy per task
    family (vtbench) or tag (--data), retention (% of unpruned accuracy), visual tokens
    into the LLM, FLOPs ratio (cost model) and measured latency ratio.

    With --data, answers are generated greedily and scored by exact match and by
    containment (an accepted answer appears in the output as whole words); a bad line of
    the file (missing image, unreadable file, no answer) is reported with its line
    number, exit 2.

    \b
    Example:
      vtdsl eval policies/fastv.vt policies/visionzip-64.vt --n 500
      vtdsl eval policies/divprune.vt --baselines --split val --json
      vtdsl eval policies/fastv.vt --weights ~/llava-1.5-7b-hf --data my.jsonl --dtype bfloat16
    """
    if data_file is not None:
        _eval_data(policy_files, weights or model_name, data_file, n, batch_size or 16, max_new_tokens, dtype,
                   device, baselines, rescale, as_json)
        return
    from ..eval.compare import compare, load_vtbench_model, render_table
    from ..eval.suites import bench_for

    model, processor, spec = load_vtbench_model(weights or model_name)
    examples = bench_for(spec).generate(split, n or 500)
    plans, rescaled = _plans(policy_files, spec, baselines, rescale)
    result = compare(plans, model, processor, spec, examples, batch_size=batch_size or 50,
                     progress=not as_json)
    result["split"] = split
    _emit(result, rescaled, render_table, as_json)


def _emit(result: dict, rescaled: dict, render, as_json: bool) -> None:
    """Print the result; a rescaled policy's row carries the mapping and the policy it ran."""
    for row in result["results"]:
        if row["policy"] in rescaled:
            row["rescaled"] = rescaled[row["policy"]]
    if as_json:
        emit_json(result)
        return
    click.echo(render(result))
    for name, info in rescaled.items():
        click.echo(f"{name}: {info['summary']}")
        for line in info["policy"].splitlines():
            if line.startswith(("at ", "every ", "budget ", "during ")):
                click.echo("  " + (line if len(line) <= 150 else line[:147] + "..."))


def _plans(policy_files: tuple[str, ...], spec, baselines: bool, rescale: bool = False) -> tuple[list, dict]:
    """(name, plan) of every POLICY, each followed by its baselines when asked, and what
    was rescaled (by name): a policy written for another model is refused without
    `rescale`."""
    from ..eval.compare import baseline_sources
    from ..ir import check
    from ..ir.rescale import portable
    from ..lang import format_policy
    from ..lang.source import parse_text
    from .lang_cmds import read_policy_source

    plans, seen, rescaled = [], set(), {}
    for path in policy_files:
        text, filename, syntax = read_policy_source(path, None)
        policy, info = portable(parse_text(text, filename=filename, syntax=syntax), spec, rescale, text=text,
                                filename=filename)
        plan = check(policy, spec, source=text, filename=filename)
        plans.append((plan.policy.name or filename, plan))
        if info is not None:
            rescaled[plans[-1][0]] = {**info.to_json(), "summary": info.summary(), "policy": format_policy(policy)}
        # a policy's budget: the visual tokens it keeps to the end of the LLM
        budget = plan.llm_visual[-1] if plan.llm_visual else plan.visual_tokens_to_llm
        if baselines and 0 < budget < spec.image_tokens:
            for base_name, source in baseline_sources(budget, spec.grid):
                if base_name not in seen:
                    seen.add(base_name)
                    plans.append((base_name, check(parse_text(source, filename=base_name), spec)))
    return plans, rescaled


def _eval_data(policy_files: tuple[str, ...], weights: str, data_file: str, n: int | None, batch_size: int,
               max_new_tokens: int | None, dtype: str, device: str, baselines: bool, rescale: bool,
               as_json: bool) -> None:
    """`eval --data`: the file is checked before the model is loaded."""
    from ..eval.data import evaluate_data, read_jsonl, render_table
    from ..models.loading import load_pretrained

    examples = read_jsonl(data_file)[:n]
    loaded = load_pretrained(weights, device=device, dtype=dtype)
    plans, rescaled = _plans(policy_files, loaded.spec, baselines, rescale)
    result = evaluate_data(loaded, plans, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           progress=not as_json)
    result["data"] = os.path.abspath(data_file)
    _emit(result, rescaled, render_table, as_json)


@click.command("show")
@click.argument("policy_file", metavar="POLICY")
@click.option("-m", "--model", "model_name", default="tiny-llava-vtbench", show_default=True,
              help=MODEL_HELP)
@click.option("--example", type=click.IntRange(min=0), default=None,
              help="Index of a vtbench example (with its question).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True)
@click.option("--image", "image_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="An image file instead of a vtbench example (resized to the model's input).")
@click.option("--question", default=None, help="The question asked with --image (text scores read it).")
@click.option("-o", "--out", "out_file", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-stage counts as JSON.")
@guarded
def show_(policy_file: str, model_name: str, example: int | None, split: str, image_file: str | None,
          question: str | None, out_file: str, as_json: bool) -> None:
    """Draw what POLICY keeps on one image: the image, then per stage the patch grid
    coloured kept (green) / merged (orange) / dropped (grey) / removed earlier (black), and
    the stage's score heat-map where it has one.

    \b
    Example:
      vtdsl show policies/visionzip-64.vt --example 3 -o kept.png
      vtdsl show policies/fastv.vt --image photo.png --question "what color is the circle?" -o kept.png
    """
    from PIL import Image, UnidentifiedImageError

    from ..eval.compare import load_vtbench_model
    from ..eval.show import show
    from ..eval.suites import bench_for
    from ..lang.errors import Diagnostic, PolicyError
    from .check_cmd import load_plan

    if (example is None) == (image_file is None):
        raise click.UsageError("give exactly one of --example N and --image FILE")
    model, processor, spec = load_vtbench_model(model_name)
    plan, _, _ = load_plan(policy_file, spec)
    if image_file is not None:
        try:
            image = Image.open(image_file).convert("RGB").resize((spec.image_size, spec.image_size))
        except (UnidentifiedImageError, OSError) as exc:
            raise PolicyError(Diagnostic(f"cannot read image {image_file}: {exc}", None, code="image")) from None
        text = question or "What shape is at the center?"
    else:
        ex = bench_for(spec).make_example(split, example)
        image, text = ex.image, question or ex.question
    stages = show(plan, model, processor, spec, image, text, out_file)
    if as_json:
        emit_json({"image": out_file, "question": text,
                   "stages": [{"site": s["text"], "kept": s["kept"], "merged": s["status"].count("merged"),
                               "dropped": s["status"].count("dropped")} for s in stages]})
    else:
        click.echo(f"wrote {out_file}: " + ", ".join(f"{s['text']} keeps {s['kept']}" for s in stages))


COMMANDS = [eval_, show_]
