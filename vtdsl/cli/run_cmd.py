"""`vtdsl run`: answer one question about one image with a policy compiled onto real weights."""

from __future__ import annotations

import time

import click

from .common import emit_json, guarded

TEXT_ENCODER_HELP = ("A local CLIP model directory (text tower, tokenizer, visual_projection) for policies that "
                     "score with 'clip_text' (Recoverable Compression).")
WEIGHTS_HELP = ("tiny-llava-vtbench (shipped) or a local HF model directory of a registered family (config.json, "
                "safetensors, sharded or not, and its processor files); its code is never run.")


def weight_options(fn):
    """--weights, --device and --dtype, shared with `vtdsl eval --data`."""
    from ..models.loading import DEVICES, DTYPES

    fn = click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                      help="Weights' dtype; auto: the checkpoint's torch_dtype. Scores are float32 whatever it is.")(fn)
    fn = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                      help="auto: cuda, else mps, else cpu.")(fn)
    return fn


@click.command("run")
@click.argument("policy_file", metavar="POLICY")
@click.option("--weights", default="tiny-llava-vtbench", show_default=True, help=WEIGHTS_HELP)
@click.option("--image", "image_file", type=click.Path(dir_okay=False), required=True, help="The image file.")
@click.option("--question", required=True, help="The question about the image.")
@click.option("--max-new-tokens", type=click.IntRange(min=1, max=4096), default=None,
              help="Longest answer in tokens (default: 1 for a vtbench-trained model, which answers in one word; "
                   "32 otherwise).")
@weight_options
@click.option("--text-encoder", "text_encoder", type=click.Path(file_okay=False), default=None,
              help=TEXT_ENCODER_HELP + " It encodes --question.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the answer, the visual tokens each stage kept, the FLOPs ratio and the prefill time.")
@guarded
def run_(policy_file: str, weights: str, image_file: str, question: str, max_new_tokens: int | None, dtype: str,
         device: str, text_encoder: str | None, as_json: bool) -> None:
    """Answer QUESTION about IMAGE with POLICY compiled onto the model in --weights.

    Exit 0 with the answer on stdout; 2 for bad input (policy, image, weights).

    \b
    Example:
      vtdsl run policies/fastv.vt --image scene.png --question "What color is the circle?"
      vtdsl run policies/visionzip-64.vt --weights ~/llava-1.5-7b-hf --image cat.jpg \\
          --question "What animal is this?" --dtype bfloat16 --json
    """
    from ..lang.errors import Diagnostic, PolicyError
    from ..models.loading import load_pretrained
    from .check_cmd import load_plan

    started = time.perf_counter()
    try:
        from ..eval.data import open_image

        image = open_image(image_file)
    except OSError as exc:
        raise PolicyError(Diagnostic(f"cannot read image {image_file}: {exc}", None, code="image")) from None
    loaded = load_pretrained(weights, device=device, dtype=dtype)
    plan, source, filename = load_plan(policy_file, loaded.spec)
    encoder = load_text_encoder(plan, text_encoder, source, filename)
    result = answer(loaded, plan, image, question, max_new_tokens, text_encoder=encoder)
    result["policy"] = plan.policy.name or filename
    result["wall_s"] = round(time.perf_counter() - started, 3)
    if as_json:
        emit_json(result)
    else:
        click.echo(result["answer"])


def load_text_encoder(plan, directory: str | None, source: str, filename: str):
    """The `clip_text` encoder from --text-encoder; a policy that reads `clip_text`
    without one is refused at that score, and an encoder a policy does not read is not loaded."""
    from ..compiler.text_encoder import NEEDS_ENCODER, TextEncoder, clip_text_term
    from ..lang.errors import Diagnostic, PolicyError

    term = clip_text_term(plan)
    if term is None:
        return None
    if directory is None:
        raise PolicyError(Diagnostic(NEEDS_ENCODER.format(model=plan.spec.name), term.span, code="text-encoder",
                                     expected="--text-encoder DIR, a local CLIP model directory"),
                          source=source, filename=filename)
    return TextEncoder.load(directory)


def answer(loaded, plan, image, question: str, max_new_tokens: int | None = None, text_encoder=None) -> dict:
    """One greedy answer under `plan` and what it cost: kept tokens per stage during the
    prefill, the FLOPs ratio for this image and prompt, the prefill time. `text_encoder`
    (`clip_text`'s) is asked the question first."""
    from .. import compiler
    from ..cost import estimate
    from ..eval.data import ForwardClock, encode, generate_answers, max_new_tokens_for, text_tokens
    from ..ir import check

    inputs = encode(loaded.processor, [image], [question])
    new_tokens = max_new_tokens_for(loaded, max_new_tokens)
    if text_encoder is not None:
        text_encoder.ask(question)
    with ForwardClock(loaded.model) as clock, compiler.apply(plan, loaded.model, spec=plan.spec,
                                                             text_encoder=text_encoder):
        text = generate_answers(loaded, inputs, new_tokens, clock)[0]
    # the cost for this image's own token counts (crops, dynamic resolution); fixed-size models: the plan's
    sized = loaded.spec.for_image(image.height, image.width)
    costed = plan if sized is loaded.spec else check(plan.policy, sized)
    report = estimate(costed, text_tokens=text_tokens(inputs, loaded.spec.image_token_id)[0])
    stages = [{"site": site, "tokens_in": n_in, "tokens_out": n_out}
              for tower in ("vit", "llm") for site, (n_in, n_out) in clock.kept.get(tower, {}).items()]
    return {"answer": text, "model": loaded.spec.name, "weights": loaded.path, "device": loaded.device,
            "dtype": loaded.dtype, "kept": stages, "flops_ratio": report.flops_ratio,
            "prefill_ms": round(1000 * clock.prefill, 3)}


COMMANDS = [run_]
