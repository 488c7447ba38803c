"""Carry a policy written for one model onto another (`eval` / `search` `--rescale`).

A policy's token counts and layer numbers are written for the model on its `model` line:
`visionzip-64` keeps 64 of LLaVA-1.5's 576 visual tokens, PDrop cuts at LLM layers 8, 16
and 24 of 32. On a model with other counts the same text means another budget, or does
not check at all, so `eval` and `search` refuse it (`refusal`) unless asked to rescale.
The rule (docs/language.md, "Portable policies"):

- **Counts** scale by the token ratio r = target visual tokens / source visual tokens
  (the tokens entering the LLM unpruned): keep/select counts, `merge` pairs, `recycle N
  into M`, `merge|add rest into M`, `attend top K` and absolute `tokens` budgets become
  round(r * N) (halves up), at least 1 when N > 0. Percentages, pool windows, neighbour
  counts (`absorb K`), text pivots and seeds are relative already and stay;
  `recycle rest into RxC cells` scales each side by sqrt(r).
- **Layers** keep their relative depth, tower by tower: layer i of L (negative i first
  resolved as L + i) becomes round(i * L' / L), clamped to 1 .. L' - 1 when i >= 1 (a cut
  after some layers stays after at least one) and to 0 .. L' - 1 otherwise; `vit.out`
  stays. Schedules and layer ranges are unrolled first; stages that land on one layer run
  there in their order (the total cut stays). A score read at an earlier layer than its
  stage stays earlier (at most the stage's layer - 1), and `over N layers` scales like a
  depth (at least 1).
- Absolute FLOPs, KV and latency budgets do not carry over: refused, located.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from ..lang import ast
from ..lang.errors import Diagnostic, PolicyError
from ..models.spec import ModelSpec
from .passes import expand_repeats

RULE = ("counts x target/source visual tokens (half up, >= 1); layers by relative depth per tower "
        "(round(i * L'/L), a cut after layer >= 1 stays >= 1); percentages unchanged; "
        "stages landing on one layer run there in order")


@dataclass
class Rescaled:
    """The rescaled policy and what changed, for the listing."""

    policy: ast.Policy
    source: str
    target: str
    ratio: Fraction
    vit_layers: tuple[int, int]
    llm_layers: tuple[int, int]
    changes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"rescaled {self.source} -> {self.target}: counts x {float(self.ratio):.4g}, ViT layers "
                f"{self.vit_layers[0]} -> {self.vit_layers[1]}, LLM layers {self.llm_layers[0]} -> "
                f"{self.llm_layers[1]}")

    def to_json(self) -> dict:
        return {"from": self.source, "to": self.target, "token_ratio": float(self.ratio),
                "vit_layers": list(self.vit_layers), "llm_layers": list(self.llm_layers),
                "rule": RULE, "changes": self.changes}


def refusal(policy: ast.Policy, target: ModelSpec, source: str | None = None, filename: str = "<policy>"):
    """The located error for a policy run on a model other than its `model` line's."""
    return PolicyError(Diagnostic(
        f"policy was written for model '{policy.model}' but would run on '{target.name}': its counts and "
        "layers mean another budget there",
        policy.model_span or policy.span,
        expected="--rescale (counts by the token ratio, layers by relative depth) or a policy written "
                 f"for '{target.name}'",
        code="model",
    ), source=source, filename=filename)


def _half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


class _Mapper:
    def __init__(self, source: ModelSpec, target: ModelSpec, src_text: str | None, filename: str):
        self.ratio = Fraction(target.image_tokens, source.image_tokens)
        self.layers = {"vit": (source.vit.layers, target.vit.layers), "llm": (source.llm.layers, target.llm.layers)}
        self.src_text, self.filename = src_text, filename
        self.changes: list[str] = []
        self.context: tuple[str, int, int] | None = None  # the stage being mapped: tower, source, target layer

    def count(self, n: int) -> int:
        return 0 if n == 0 else max(1, _half_up(n * self.ratio))

    def quantity(self, q: ast.Quantity) -> ast.Quantity:
        if q.percent:
            return q
        new = self.count(int(q.value))
        if new != q.value:
            self.changes.append(f"{q.value} -> {new} tokens")
        return q.model_copy(update={"value": new})

    def layer(self, tower: str, index: int) -> int:
        src, dst = self.layers[tower]
        i = index + src if index < 0 else index
        j = _half_up(Fraction(i * dst, src))
        return max(1 if i >= 1 else 0, min(j, dst - 1))

    def stage(self, stage: ast.Stage) -> ast.Stage:
        """A stage with its site, counts and the sites of the scores it reads mapped."""
        site = self.site(stage.site)
        self.context = None
        if stage.site.index is not None:
            src = stage.site.index + self.layers[stage.site.tower][0] if stage.site.index < 0 else stage.site.index
            self.context = (stage.site.tower, src, site.index)
        try:
            return stage.model_copy(update={"site": site, "action": self.node(stage.action)})
        finally:
            self.context = None

    def site(self, site: ast.Site) -> ast.Site:
        if site.index is None:
            return site
        index = self.layer(site.tower, site.index)
        if self.context is not None and self.context[0] == site.tower:
            src = site.index + self.layers[site.tower][0] if site.index < 0 else site.index
            if src < self.context[1]:  # read before the stage: stays before it
                index = min(index, max(0, self.context[2] - 1))
        new = site.model_copy(update={"index": index})
        if new.index != site.index:
            self.changes.append(f"{site.text()} -> {new.text()}")
        return new

    def node(self, value):
        """A copy of an AST value with every site and token count mapped."""
        if isinstance(value, list):
            return [self.node(v) for v in value]
        if isinstance(value, ast.Quantity):
            return self.quantity(value)
        if isinstance(value, ast.Site):
            return self.site(value)
        if not isinstance(value, ast.Node):
            return value
        update = {}
        for name in type(value).model_fields:
            if name.endswith("span") or name in _RELATIVE.get(type(value).__name__, ()):
                continue
            update[name] = self.node(getattr(value, name))
        if getattr(value, "kind", None) == "cells":
            side = math.sqrt(self.ratio)
            update["rows"] = max(1, round(value.rows * side))
            update["cols"] = max(1, round(value.cols * side))
        if isinstance(value, (ast.ScoreRef, ast.ScoreCombine)) and value.to is not None and value.at is not None:
            update["to"] = self.layer(value.at.tower, value.to)
        if isinstance(value, ast.Adaptive) and value.steps is not None and self.context is not None:
            src, dst = self.layers[self.context[0]]
            update["steps"] = max(1, _half_up(Fraction(value.steps * dst, src)))
        return value.model_copy(update=update)

    def budget(self, b: ast.Budget) -> ast.Budget:
        if b.percent:
            return b
        if b.metric == "tokens":
            return b.model_copy(update={"value": self.count(int(b.value))})
        raise PolicyError(Diagnostic(
            f"an absolute '{b.metric}' budget is a figure of the source model and cannot be rescaled",
            b.span, expected=f"'budget {b.metric} {b.op} N%' (relative to the unpruned model)", code="budget",
        ), source=self.src_text, filename=self.filename)


# Fields that hold no token count although they are Quantities: neighbours of `absorb K`.
_RELATIVE = {"Absorb": ("neighbours",), "SelectTerm": ("text_pivots", "seed")}


def rescale(policy: ast.Policy, source: ModelSpec, target: ModelSpec, *, text: str | None = None,
            filename: str = "<policy>") -> Rescaled:
    """`policy` (written for `source`) with its counts and layers mapped onto `target`
    by the rule of this module's doc; raise `PolicyError` (located) where it cannot."""
    expanded, diagnostics = expand_repeats(policy, source)
    errors = [d for d in diagnostics if d.severity == "error"]
    if errors:
        raise PolicyError(errors, source=text, filename=filename)
    m = _Mapper(source, target, text, filename)
    stages = [m.stage(s) for s in expanded.stages]
    decode = [d.model_copy(update={"site": m.site(d.site), "qty": d.qty and m.quantity(d.qty)})
              for d in expanded.decode]
    budgets = [m.budget(b) for b in expanded.budgets]
    new = expanded.model_copy(update={"model": target.name, "stages": stages, "decode": decode, "budgets": budgets})
    return Rescaled(new, source.name, target.name, m.ratio, (source.vit.layers, target.vit.layers),
                    (source.llm.layers, target.llm.layers), list(dict.fromkeys(m.changes)))


def same_counts(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether a policy's counts and layers mean the same on both models."""
    return (a.image_tokens, a.vit.layers, a.llm.layers) == (b.image_tokens, b.vit.layers, b.llm.layers)


def portable(policy: ast.Policy, target: ModelSpec, rescale_it: bool, *, text: str | None = None,
             filename: str = "<policy>") -> tuple[ast.Policy, Rescaled | None]:
    """The policy to run on `target`: itself when its `model` line names `target` or a
    model of the same visual tokens and layer counts (or it has none), its rescaled copy
    with `rescale_it`, else the located refusal."""
    if not policy.model:
        return policy, None
    from ..models import get_spec

    try:
        source = get_spec(policy.model)
    except PolicyError as err:
        d = err.diagnostics[0]
        raise PolicyError(Diagnostic(d.message, policy.model_span or policy.span, expected=d.expected, hint=d.hint,
                                     code="model"), source=text, filename=filename) from None
    if source.name == target.name or same_counts(source, target):
        # the same counts and depths (a local copy of the checkpoint, a tiny twin): the
        # policy means there what it means on its own model
        return policy, None
    if not rescale_it:
        raise refusal(policy, target, text, filename)
    done = rescale(policy, source, target, text=text, filename=filename)
    return done.policy, done
