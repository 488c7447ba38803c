"""`compile` / `apply`: install a checked plan on a model, reversibly (`installer.Installer`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from torch import Tensor, nn

from ..ir.plan import Plan
from ..lang import ast
from ..lang.errors import PolicyError
from ..models.spec import ModelSpec
from .families import FAMILIES
from .handle import Compiled, compiled
from .installer import Installer
from .runtime import CompileError


# ---------------------------------------------------------------------- plan resolution
def _spec_of(model: nn.Module, spec: ModelSpec | str | None) -> ModelSpec:
    from ..models import get_spec, spec_from_config

    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return get_spec(spec)
    return spec_from_config(model)


_SAME = ("vit", "llm", "image_size", "patch_size", "has_cls", "vision_feature_layer", "select_strategy", "vit_crops")


def _check_fits(plan_spec: ModelSpec, model_spec: ModelSpec) -> None:
    # the towers' shapes, then the layout fields either family names, then the family
    layout = [name for spec in (plan_spec, model_spec) if spec.family in FAMILIES
              for name in FAMILIES[spec.family].layout_fields]
    for name in (*_SAME, *dict.fromkeys(layout), "family"):
        a, b = getattr(plan_spec, name), getattr(model_spec, name)
        if a != b:
            raise CompileError(
                f"the plan was checked against '{plan_spec.name}', whose {name} ({a}) differs from the model's ({b})"
            )


def resolve_plan(policy: Plan | ast.Policy | str | Path, model: nn.Module, spec: ModelSpec | str | None = None) -> Plan:
    """A checked `Plan` for `model` from a Plan, an AST, a path or policy source text.

    Without `spec` the model's spec comes from its config; when the policy names a
    registered model (``model "llava-1.5-7b"``) with the same architecture, that spec
    (and its name) is used, so no "written for another model" warning appears.
    """
    from ..ir import check
    from ..lang.source import load_policy
    from ..models import get_spec

    model_spec = _spec_of(model, spec)
    if isinstance(policy, Plan):
        _check_fits(policy.spec, model_spec)
        return policy
    policy, source, filename = load_policy(policy)
    if spec is None and policy.model:
        try:
            named = get_spec(policy.model)
            _check_fits(named, model_spec)
            model_spec = named
        except (CompileError, ValueError, PolicyError):
            pass  # a different architecture: check against the model's own spec (and warn)
    return check(policy, model_spec, source=source, filename=filename)


# ---------------------------------------------------------------------- public API
def compile(policy, model: nn.Module, *, spec: ModelSpec | str | None = None,  # noqa: A001
            text_encoder=None) -> nn.Module:
    """Rewrite `model` (a transformers model of a family in `vtdsl.compiler.families`) to
    run `policy`, in place.

    Parameters
    ----------
    policy : Plan, Policy, path or str
        A checked `vtdsl.ir.plan.Plan`, a parsed policy, a `.vt`/`.yaml` path, or source.
    model : LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, ...
        Any model of those families (real weights or the meta device); its `ModelSpec` is inferred
        from its config with `vtdsl.models.spec_from_config` unless `spec` is given.
    text_encoder : TextEncoder or path, optional
        The auxiliary CLIP text tower (and visual projection) a `clip_text` score needs
        (`vtdsl.compiler.text_encoder`); a directory path is loaded. A policy with
        `clip_text` is refused without one; ``text_encoder.ask(question)`` before a call.

    Returns
    -------
    The same model object, rewritten. `vtdsl.compiler.compiled(model)` gives the handle
    (plan, listing); `uncompile(model)` undoes the rewrite.

    Notes
    -----
    - Prompts keep the processor's placeholder count: the compiled forward / generate
      shorten each image's run to the compiled count (`image_token_count`); `generate`
      still returns the caller's `input_ids` followed by the new tokens
      (`vtdsl.compiler.generation`).
    - After an LLM stage the sequence is shorter from that layer on: `logits` cover the
      kept positions in order (`kept_tokens` says which image positions survived),
      `labels` are gathered to them automatically, and the KV cache of layers >= K is
      shorter. Decoding needs the default `DynamicCache`.
    - Do not deep-copy a compiled model (its hooks would point at the original's
      bookkeeping); compile the copy instead.
    """
    plan = resolve_plan(policy, model, spec)
    Installer(plan, model, text_encoder=_text_encoder_for(plan, text_encoder)).install()
    return model


@contextlib.contextmanager
def apply(policy, model: nn.Module, *, spec: ModelSpec | str | None = None,
          text_encoder=None) -> Iterator[nn.Module]:
    """`with apply(policy, model):` runs `policy` inside the block and restores the
    original module tree on exit (hooks removed, swapped modules put back)."""
    plan = resolve_plan(policy, model, spec)
    with Installer(plan, model, text_encoder=_text_encoder_for(plan, text_encoder)):
        yield model


def _text_encoder_for(plan: Plan, text_encoder):
    """The text encoder a `clip_text` score reads (loaded from a path), or the located
    refusal of the first such score when none is given."""
    from .text_encoder import NEEDS_ENCODER, as_text_encoder, clip_text_term

    term = clip_text_term(plan)
    if term is not None and text_encoder is None:
        where = f"line {term.span.line}, column {term.span.column}: " if term.span is not None else ""
        raise CompileError(f"{where}{NEEDS_ENCODER.format(model=plan.spec.name)}; expected: a text encoder "
                           "(compile(..., text_encoder=DIR), vtdsl run --text-encoder DIR)")
    return as_text_encoder(text_encoder)


def uncompile(model: nn.Module) -> nn.Module:
    """Undo `compile(…, model)`; a model that is not compiled is returned unchanged."""
    handle = compiled(model)
    if handle is not None:
        handle.remove()
    return model


def image_token_count(model: nn.Module) -> int:
    """Image placeholder tokens per image that `model` (compiled or not) expects."""
    handle = compiled(model)
    if handle is not None:
        return handle.image_tokens
    return original_image_token_count(model)


def original_image_token_count(model: nn.Module) -> int:
    """Image placeholder tokens per image of the unpruned model."""
    handle = compiled(model)
    if handle is not None:
        return handle.original_image_tokens
    return _spec_of(model, None).image_tokens


def kept_counts(model: nn.Module) -> dict[str, dict[str, tuple[int, int]]]:
    """Visual tokens per image (in, out) at each stage during the last forward."""
    handle = compiled(model)
    if handle is None:
        return {"vit": {}, "llm": {}}
    return {"vit": dict(handle.log.vit), "llm": dict(handle.log.llm)}


def kept_tokens(model: nn.Module) -> dict[str, Tensor]:
    """Which tokens each stage kept during the last forward (see `ForwardLog`)."""
    handle = compiled(model)
    return {} if handle is None else dict(handle.log.kept)


__all__ = [
    "Compiled",
    "kept_tokens",
    "CompileError",
    "apply",
    "compile",
    "compiled",
    "image_token_count",
    "kept_counts",
    "original_image_token_count",
    "resolve_plan",
    "uncompile",
]
