"""`vtdsl check`: resolve a policy against a model, count its tokens, cost it, judge budgets."""

from __future__ import annotations

import sys

import click

from .common import EXIT_FAILED, emit_json, guarded


def parse_image_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    """`--image HxW` (pixels, height first) -> (height, width)."""
    if value is None:
        return None
    height, sep, width = value.lower().partition("x")
    if not sep or not height.strip().isdigit() or not width.strip().isdigit() or int(height) < 1 or int(width) < 1:
        raise click.BadParameter(f"expected HEIGHTxWIDTH in pixels such as 600x800, not {value!r}")
    return int(height), int(width)


def parse_video_size(ctx, param, value: str | None) -> tuple[int, int, int] | None:
    """`--video FRAMESxHxW` (frames, then pixels, height first) -> (frames, height, width)."""
    if value is None:
        return None
    parts = [p.strip() for p in value.lower().split("x")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise click.BadParameter(f"expected FRAMESxHEIGHTxWIDTH such as 16x448x448 (frames, then pixels), "
                                 f"not {value!r}")
    frames, height, width = map(int, parts)
    return frames, height, width


def parse_text_tokens(ctx, param, value: str) -> tuple[int, ...]:
    """`--text-tokens 64`, or a list of prompt lengths `15,23,83` the figures are averaged
    over (one per benchmark, as DivPrune's FLOPs script does)."""
    parts = [p.strip() for p in str(value).split(",")]
    if not parts or not all(p.isdigit() and int(p) <= 1_000_000 for p in parts):
        raise click.BadParameter(f"expected a token count or a comma-separated list such as 15,23,83, not {value!r}")
    return tuple(int(p) for p in parts)


def parse_convention(ctx, param, value: str | None) -> str | None:
    """A row of vtdsl.cost.conventions.CONVENTIONS, looked up only when given (importing
    the cost model for every command's --help would slow them all down)."""
    if value is None:
        return None
    from ..cost.conventions import CONVENTIONS

    if value not in CONVENTIONS:
        raise click.BadParameter(f"unknown convention {value!r}; expected one of: {', '.join(CONVENTIONS)}")
    return value


def load_plan(policy_file: str, model: str | None, syntax: str | None = None,
              image: tuple[int, int] | None = None, video: tuple[int, int, int] | None = None,
              pan_and_scan: bool = False):
    """Parse POLICY (path or '-') and check it against MODEL (default: the policy's hint),
    for an image of `image` = (height, width) pixels when given (anyres and
    dynamic-resolution models count tokens by image size), or a video of `video` =
    (frames, height, width); `pan_and_scan`: Gemma 3's processor cuts its crops."""
    from ..ir import check
    from ..lang.errors import Diagnostic, PolicyError
    from ..models import get_spec
    from ..lang.source import parse_text
    from .lang_cmds import read_policy_source

    text, filename, syntax = read_policy_source(policy_file, syntax)
    policy = parse_text(text, filename=filename, syntax=syntax)
    model = model or policy.model
    if model is None:
        raise PolicyError(
            Diagnostic(
                "no model to check against: the policy has no `model \"...\"` line",
                policy.span,
                expected="--model NAME (see `vtdsl models`) or a model line in the policy",
                code="model",
            ),
            source=text,
            filename=filename,
        )
    if pan_and_scan:
        from ..models.families.gemma3 import with_pan_and_scan

        try:
            model = with_pan_and_scan(get_spec(model))
        except PolicyError as err:
            raise PolicyError(err.diagnostics, source=text, filename=filename) from None
    if image is not None or video is not None:
        spec = get_spec(model)
        try:
            model = spec.for_image(*image) if video is None else spec.for_video(*video)
        except ValueError as err:
            expected = "--image with sides the model accepts" if video is None else \
                "--video on a model that takes video (qwen2-vl, qwen2.5-vl, llava-onevision, llava-next-video), " \
                "sides it accepts"
            raise PolicyError(Diagnostic(str(err), expected=expected, code="model"),
                              source=text, filename=filename) from None
    return check(policy, model, source=text, filename=filename), text, filename


def _ratio(x: float) -> str:
    return f"{100 * x:.2f}%"


def check_payload(plan, report, verdicts, warnings, latency=None, figures=None) -> dict:
    cost = report.to_json()
    payload = {
        "policy": plan.policy.name,
        "model": plan.spec.name,
        "text_tokens": report.text_tokens,
        "stages": [
            {
                "site": stage.site.text(),
                "action": stage.action,
                "tokens_in": stage.tokens_in,
                "tokens_out": stage.tokens_out,
                # adaptive counts (`top N by ...`): tokens_in/out are the most, these the fewest
                "fewest_in": stage.fewest_in,
                "fewest_out": stage.fewest_out,
            }
            for stage in plan.stages
        ],
        "visual_tokens_to_llm": plan.visual_tokens_to_llm,
        "crops": plan.spec.vit_crops,  # ViT token counts are per crop
        "tokens": {
            "vit": plan.vit_tokens,
            "projector": plan.projector_tokens,
            "llm_visual": plan.llm_visual,
        },
        "flops": cost["flops"],
        "flops_fastv": cost["flops_fastv"],
        "kv_cache_bytes": cost["kv_cache_bytes"],
        "decode_flops_per_token": cost["decode_flops_per_token"],
        "scorers": cost["scorers"],
        "conventions": cost["conventions"] if figures is None else figures["conventions"],
        "notes": cost["notes"],
        "budget": verdicts,
        "ok": all(v["ok"] for v in verdicts),
        "diagnostics": [d.to_json() for d in warnings],
    }
    if plan.spec.video_frames:  # a video's frames; its crops are the temporal groups of frames
        payload["video_frames"] = plan.spec.video_frames
    if latency is not None:
        payload["latency"] = latency.to_json()
    if figures is not None:
        payload.update({k: v for k, v in figures.items() if k != "conventions"})
    return payload


def token_range(fewest: int, most: int) -> str:
    """`576`, or `64..576` when an adaptive count makes it vary per call."""
    return str(most) if fewest == most else f"{fewest}..{most}"


def render_text(payload: dict, report, latency=None, convention: str | None = None) -> str:
    lines = [f"policy {payload['policy'] or '(unnamed)'} on {payload['model']}"]
    rows = [("stage", "site", "action", "tokens in -> out")]
    for i, stage in enumerate(payload["stages"]):
        per = " per crop" if payload.get("crops", 1) > 1 and stage["site"].startswith("vit.") else ""
        counts = f"{token_range(stage['fewest_in'], stage['tokens_in'])} -> " \
                 f"{token_range(stage['fewest_out'], stage['tokens_out'])}"
        rows.append((str(i), stage["site"], stage["action"], counts + per))
    if len(rows) == 1:
        rows.append(("-", "-", "(no stages: the unpruned model)", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if payload.get("video_frames"):
        frames, crops = payload["video_frames"], payload["crops"]
        lines.append(f"video: {frames} frames, ViT counts per frame" if frames == crops else
                     f"video: {frames} frames in {crops} temporal groups, ViT counts per group")
    lines.append(f"visual tokens into the LLM: {payload['visual_tokens_to_llm']}")
    lines.append("")
    lines.append(report.summary())
    lines += convention_lines(payload, convention)
    if latency is not None:
        lines.append(latency.summary())
    for note in payload["notes"]:
        lines.append(f"note: {note}")
    if payload["budget"]:
        lines.append("")
        lines.append("budget:")
        for v in payload["budget"]:
            mark = "ok  " if v["ok"] else "OVER"
            lines.append(f"  {mark} {v['constraint']}  (policy: {_budget_value(v)})")
    return "\n".join(lines)


def convention_figures(plan, lengths, logits, newlines, expect_tokens) -> dict:
    """The convention figures over several prompt lengths, without LLaVA-NeXT's newline
    tokens, and for an adaptive policy's expected token count: the payload keys they add."""
    from ..cost import estimate
    from ..cost.estimate import estimate_expected
    from ..cost.report import average_conventions

    out: dict = {"conventions": average_conventions([estimate(plan, t, logits) for t in lengths], newlines)}
    if len(lengths) > 1:
        out["text_tokens_list"] = list(lengths)
    if not newlines:
        out["newlines"] = False
    if expect_tokens is not None:
        reports = [estimate_expected(plan, expect_tokens, t, logits) for t in lengths]
        first = reports[0]
        out["expected"] = {
            "adaptive_tokens": expect_tokens,
            "visual_tokens_to_llm": first.policy.visual,
            "tokens": {"vit": list(first.vit_tokens), "llm_visual": list(first.llm_visual)},
            "conventions": average_conventions(reports, newlines),
        }
    return out


def convention_lines(payload: dict, convention: str | None) -> list[str]:
    """The --convention figure, the list of prompt lengths, and the expected figures."""
    lines = []
    lengths = payload.get("text_tokens_list")
    over = f" (mean over {len(lengths)} prompt lengths)" if lengths else ""
    if convention is not None and (lengths or convention not in ("hf", "fastv")):  # else the summary has it
        lines.append(_convention_line(convention, payload["conventions"][convention], over))
    expected = payload.get("expected")
    if expected is not None:
        lines.append(f"expected, adaptive stages keeping {expected['adaptive_tokens']} tokens "
                     f"({expected['visual_tokens_to_llm']} visual tokens enter the LLM):")
        for name in dict.fromkeys(["hf", "fastv", convention or "hf"]):
            lines.append("  " + _convention_line(name, expected["conventions"][name], over))
    return lines


def _convention_line(name: str, row: dict, over: str) -> str:
    from ..cost.report import _fmt_flops

    pct = f" = {100 * row['ratio']:.2f}%" if row["ratio"] is not None else ""
    return f"FLOPs ({name}) {_fmt_flops(row['policy'])} / {_fmt_flops(row['baseline'])}{pct}{over}"


def _budget_value(verdict: dict) -> str:
    pct = verdict.get("percent_of_baseline")
    value = verdict["value"]
    if verdict["metric"] in ("latency", "decode_latency"):
        shown = f"{1e3 * value:.4g} ms"
    else:
        shown = f"{value:,.0f}" if isinstance(value, (int, float)) and value >= 1000 else f"{value}"
    return f"{shown}, {pct:.2f}% of unpruned" if pct is not None else shown


@click.command("check")
@click.argument("policy_file", metavar="POLICY")
@click.option("--model", "-m", help="Model name (see `vtdsl models`) or a local model directory.")
@click.option("--text-tokens", default="64", show_default=True, callback=parse_text_tokens, metavar="N[,N...]",
              help="Text tokens in the prompt, for FLOPs and KV bytes; a comma-separated list of prompt "
                   "lengths averages the convention figures over them (the other figures use the mean length).")
@click.option("--logits", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="lm_head rows counted: the last position (generate's prefill) or every position.")
@click.option("--convention", metavar="NAME", callback=parse_convention,
              help="Also print FLOPs in a paper's counting convention: hf, fastv, pdrop, divprune, sparsevlm, ... "
                   "(docs/cost-model.md lists them); --json has them all.")
@click.option("--newlines/--no-newlines", default=True, show_default=True,
              help="Count LLaVA-NeXT's newline tokens in the convention figures.")
@click.option("--expect-tokens", type=click.IntRange(0, 1_000_000), metavar="N",
              help="Adaptive policies: also report the figures when the adaptive stages keep N tokens on "
                   "average (e.g. the mean measured by an eval run); the plain figures are the bound.")
@click.option("--budget", "budgets", multiple=True, metavar="EXPR",
              help='Extra budget constraint, e.g. "flops <= 25%". Repeatable.')
@click.option("--decode-context", default=0, show_default=True, type=click.IntRange(0, 1_000_000),
              help="Tokens generated before the decode step whose FLOPs are reported.")
@click.option("--image", metavar="HxW", callback=parse_image_size,
              help="Image size in pixels (height x width) for models whose token count depends on it "
                   "(llava-next-7b, qwen2.5-vl-7b); default: the model's reference image.")
@click.option("--video", metavar="FRAMESxHxW", callback=parse_video_size,
              help="A video prompt instead of an image (qwen2-vl-7b, qwen2.5-vl-7b, llava-onevision-7b, "
                   "llava-next-video-7b): frames, then each frame's "
                   "height x width in pixels; exclusive with --image.")
@click.option("--pan-and-scan", is_flag=True,
              help="Gemma 3: count the pan-and-scan crops the processor cuts from --image when called with "
                   "do_pan_and_scan=True (the checkpoints' preprocessor leaves it off).")
@click.option("--device", metavar="NAME",
              help="Predict prefill and decode latency on a device profile: a100, h100, h200, l40s, rtx4090, "
                   "or cpu after `vtdsl calibrate` (or a profile JSON file).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="Prompts per batch, for --device.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Weights' dtype for --device (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guarded
def check_(policy_file: str, model: str | None, text_tokens: tuple[int, ...], logits: str, convention: str | None,
           newlines: bool, expect_tokens: int | None, budgets: tuple[str, ...], decode_context: int,
           image: tuple[int, int] | None, video: tuple[int, int, int] | None, pan_and_scan: bool,
           device: str | None, batch: int, dtype: str | None, as_json: bool) -> None:
    """Check POLICY against a model: stages, token counts, cost and budget verdicts.

    Exit 0 when the policy is valid and within every budget, 1 when over budget,
    2 for invalid input (the error names file, line and column).

    \b
    Example:
      vtdsl check policies/fastv.vt --model llava-1.5-7b
      vtdsl check policies/visionzip.vt -m llava-1.5-7b --budget "flops <= 25%" --json
      vtdsl check policies/fastv.vt -m llava-next-7b --image 600x800
      vtdsl check policies/fastv.vt -m qwen2.5-vl-7b --video 16x448x448
      vtdsl check policies/fastv.vt -m gemma-3-4b --image 300x1000 --pan-and-scan
      vtdsl check policies/fastv.vt -m llava-onevision-7b --video 16x384x384
      vtdsl check policies/visionzip-64.vt -m llava-1.5-7b --device h100 --batch 8 --budget "latency <= 40%"
      vtdsl check policies/divprune.vt -m llava-1.5-7b --convention divprune --text-tokens 15,23,83
    """
    from ..cost import estimate, parse_budget, verdicts
    from ..lang.errors import PolicyError

    if image is not None and video is not None:
        raise click.UsageError("--image and --video are exclusive: a prompt is one image or one video")
    plan, source, filename = load_plan(policy_file, model, image=image, video=video, pan_and_scan=pan_and_scan)
    extra = [parse_budget(text) for text in budgets]
    mean_text = text_tokens[0] if len(text_tokens) == 1 else round(sum(text_tokens) / len(text_tokens))
    report = estimate(plan, text_tokens=mean_text, logits=logits, decode_context=decode_context)
    figures = None
    if len(text_tokens) > 1 or not newlines or expect_tokens is not None:
        figures = convention_figures(plan, text_tokens, logits, newlines, expect_tokens)
    latency = None
    if device is not None:
        from ..cost.devices import get_device
        from ..cost.latency import predict

        latency = predict(report, get_device(device), batch=batch, dtype=dtype)
    try:
        judged = verdicts(report, list(plan.policy.budgets) + extra, latency=latency)
    except PolicyError as err:  # a latency budget without --device: quote the policy's line
        raise PolicyError(err.diagnostics, source=source, filename=filename) from None
    payload = check_payload(plan, report, judged, plan.diagnostics, latency, figures)
    if as_json:
        emit_json(payload)
    else:
        for warning in plan.diagnostics:
            click.echo(warning.format(source, filename), err=True)
        click.echo(render_text(payload, report, latency, convention))
    sys.exit(0 if payload["ok"] else EXIT_FAILED)


COMMANDS = [check_]
