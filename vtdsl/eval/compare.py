"""Policies side by side on vtbench: accuracy, retention, tokens, FLOPs and latency.

    from vtdsl.eval.compare import load_vtbench_model, compare
    model, processor, spec = load_vtbench_model("tiny-llava-vtbench2")
    result = compare([("fastv", plan)], model, processor, spec, examples)

Every policy runs on the same examples as the unpruned model, installed with
`vtdsl.compiler.apply` (so the model is restored after each), through the batched harness.
Retention is a policy's accuracy over the unpruned accuracy; the latency ratio is its
summed prefill time over the unpruned one in the same run; the FLOPs ratio comes from the
cost model at the benchmark's mean prompt length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..lang.errors import Diagnostic, PolicyError


def load_vtbench_model(name_or_dir: str):
    """(model, processor, spec) of a shipped vtbench model (tiny-llava-vtbench2, v1's
    tiny-llava-vtbench; package data) or of a local directory holding a LLaVA trained on
    vtbench (config, safetensors, processor files)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from ..models import get_spec, load_weights
    from ..models.vtbench import NAME, SHIPPED_DIRS, vtbench_spec

    shipped = name_or_dir in SHIPPED_DIRS
    path = SHIPPED_DIRS[name_or_dir] if shipped else Path(name_or_dir)
    if not (path / "config.json").is_file():
        script = "examples/train_tiny_vlm.py" if name_or_dir == NAME else "examples/train_tiny_vlm2.py"
        hint = (f"train it with {script} (docs/vtbench.md)" if shipped
                else "a directory written by examples/train_tiny_vlm2.py --export DIR")
        raise PolicyError(Diagnostic(f"no trained vtbench model at {path}", None,
                                     expected=f"{' or '.join(SHIPPED_DIRS)} or a model directory with config.json",
                                     hint=hint, code="model"))
    if shipped:
        spec = vtbench_spec() if name_or_dir == NAME else get_spec(name_or_dir)
        model = LlavaForConditionalGeneration.from_pretrained(path, use_safetensors=True, local_files_only=True)
    else:
        # a user's directory: its config.json checked by the registry, then safetensors
        # only, every tensor accounted for (a malformed checkpoint is one located error)
        spec = get_spec(str(path.resolve()))
        model = load_weights(spec, str(path))
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor, spec


def pool_grid_for(tokens: int, grid: tuple[int, int]) -> tuple[int, int]:
    """The square `pool RxR` whose output count is closest to `tokens` (ties: more tokens),
    the pooling baseline at a policy's budget."""
    rows, cols = grid
    best = None
    for r in range(1, max(rows, cols) + 1):
        out = math.ceil(rows / r) * math.ceil(cols / r)
        key = (abs(out - tokens), -out)
        if best is None or key < best[0]:
            best = (key, r)
    return best[1], best[1]


def baseline_sources(tokens: int, grid: tuple[int, int], seed: int = 0) -> list[tuple[str, str]]:
    """`random` and `pool` policies at a budget of `tokens` visual tokens into the LLM."""
    r, c = pool_grid_for(tokens, grid)
    return [(f"random-{tokens}", f'policy "random-{tokens}"\nat vit.out keep random {tokens} seed {seed}\n'),
            (f"pool-{r}x{c}", f'policy "pool-{r}x{c}"\nat vit.out pool {r}x{c}\n')]


def batch_size_for(plan, batch_size: int) -> int:
    """Images per forward under `plan`: adaptive counts are one per call, so one image per
    batch gives each image its own."""
    return 1 if plan is not None and plan.adaptive else batch_size


def mean_text_tokens(examples: Sequence[Any], tokenizer: Any) -> int:
    """Mean prompt length without the image placeholders (the cost model's text tokens)."""
    from .bench import prompt

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    lengths = [len(tok(prompt(ex.question, 0))["input_ids"]) for ex in examples]
    return round(sum(lengths) / max(len(lengths), 1))


def compare(plans: Sequence[tuple[str, Any]], model, processor, spec, examples: Sequence[Any], *,
            batch_size: int = 50, progress: bool = True) -> dict[str, Any]:
    """Evaluate the unpruned model and every ``(name, plan)`` on `examples`."""
    from .. import compiler
    from ..cost import estimate
    from .harness import evaluate

    text_tokens = mean_text_tokens(examples, processor)

    def run(label: str, size: int = batch_size) -> dict[str, Any]:
        if progress:
            import sys

            print(f"{label}:", file=sys.stderr)
        return evaluate(model, examples, processor, batch_size=size, progress=progress)

    base = run("unpruned")
    rows = [_row("unpruned", base, base, spec.image_tokens, 1.0)]
    for name, plan in plans:
        with compiler.apply(plan, model, spec=spec):
            res = run(name, batch_size_for(plan, batch_size))
        ratio = estimate(plan, text_tokens=text_tokens).flops_ratio
        rows.append(_row(name, res, base, plan.visual_tokens_to_llm, ratio, bound=plan.adaptive))
    return {"model": spec.name, "examples": len(examples), "text_tokens": text_tokens, "results": rows}


def _row(name: str, res: dict[str, Any], base: dict[str, Any], tokens: int, flops_ratio: float,
         bound: bool = False) -> dict[str, Any]:
    return {
        "policy": name,
        "visual_tokens_to_llm": tokens,
        # adaptive counts: tokens and FLOPs are the upper bound the cost model charges
        "bound": bound,
        "accuracy": res["overall"],
        "per_family": res["per_family"],
        "retention": res["overall"] / base["overall"] if base["overall"] else None,
        "flops_ratio": flops_ratio,
        "prefill_ms_per_example": res["prefill_ms_per_example"],
        "latency_ratio": res["prefill_s"] / base["prefill_s"] if base["prefill_s"] else None,
    }


def render_table(result: dict[str, Any]) -> str:
    rows = result["results"]
    families = list(rows[0]["per_family"]) if rows else []
    head = ["policy", "tokens", "FLOPs", "latency", "accuracy", "retention", *families]
    table = [head]
    for r in rows:
        table.append([
            r["policy"], ("≤ " if r.get("bound") else "") + str(r["visual_tokens_to_llm"]),
            ("≤ " if r.get("bound") else "") + f"{100 * r['flops_ratio']:.1f}%",
            f"{r['latency_ratio']:.2f}x" if r["latency_ratio"] is not None else "-",
            f"{100 * r['accuracy']:.1f}", f"{100 * r['retention']:.1f}%" if r["retention"] is not None else "-",
            *(f"{100 * r['per_family'].get(f, 0):.1f}" for f in families),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"{result['model']}: {result['examples']} examples, {result['text_tokens']} text tokens per prompt"]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
