"""Cost reports of a plan or of raw per-layer token counts: `vtdsl.cost.model`'s formulas
summed into a `CostReport` (kept apart from the formulas so that the report, which reads
them, and the estimators, which build reports, import in one direction)."""

from __future__ import annotations

from typing import Iterable, Sequence

from ..models.spec import ModelSpec
from .model import Logits, _baseline, _scorer_total, _side, constants
from .report import CostReport


def estimate_counts(
    spec: ModelSpec,
    vit_tokens: Sequence[int],
    projector_tokens: int,
    llm_visual: Sequence[int],
    text_tokens: int = 64,
    *,
    observations: Iterable = (),
    stages: Iterable = (),
    extra_flops: int = 0,
    logits: Logits = "last",
    decode_context: int | None = None,
):
    """Cost of a prefill with the given per-layer token counts (no Plan needed).

    `vit_tokens[i]`: tokens entering ViT layer i (CLS included; per crop);
    `projector_tokens`: visual tokens entering the projector; `llm_visual[j]`: visual
    tokens entering LLM layer j; `text_tokens`: the non-image positions of the prompt.
    `observations` (vtdsl.ir.plan.Observation) and `stages` (ResolvedStage) add the
    scorer extras of the contract; `extra_flops` adds any other counted work.
    `decode_context`: tokens generated before the decode step that is costed (None = 0,
    the first step after prefill).
    """
    k = constants(spec)
    if len(vit_tokens) != k.vit_layers:
        raise ValueError(f"vit_tokens has {len(vit_tokens)} entries; '{spec.name}' has {k.vit_layers} ViT layers")
    if len(llm_visual) != k.llm_layers:
        raise ValueError(f"llm_visual has {len(llm_visual)} entries; '{spec.name}' has {k.llm_layers} LLM layers")
    if logits != "last" and logits != "all":
        raise ValueError(f"logits must be 'last' or 'all', not {logits!r}")
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    ctx = decode_context or 0
    if ctx < 0:
        raise ValueError(f"decode_context must be >= 0, got {decode_context}")
    observations = tuple(observations)
    stages = tuple(stages)
    scorers = extra_flops
    if observations or stages:
        scorers += _scorer_total(k, vit_tokens, llm_visual, text_tokens, observations, stages)
    policy = _side(k, vit_tokens, projector_tokens, llm_visual, text_tokens, logits, ctx, scorers)
    baseline = _baseline(k, text_tokens, logits, ctx)
    return CostReport(
        spec, text_tokens, logits, ctx, baseline, policy, vit_tokens, llm_visual, observations, stages, extra_flops
    )


def estimate(plan, text_tokens: int = 64, logits: Logits = "last", decode_context: int | None = None):
    """Cost of `plan` (a `vtdsl.ir.plan.Plan`) against the unpruned model."""
    report = estimate_counts(
        plan.spec,
        plan.vit_tokens,
        plan.projector_tokens,
        plan.llm_visual,
        text_tokens,
        observations=plan.observations,
        stages=plan.stages,
        logits=logits,
        decode_context=decode_context,
    )
    report.decode_selection = plan.decode[0] if getattr(plan, "decode", None) else None
    return report


# ------------------------------------------------------------------ adaptive plans
def expected_counts(plan, tokens: int) -> tuple[list[int], int, list[int]]:
    """Per-layer counts of `plan` when its adaptive stages (`top N by ...`) keep, on
    average, `tokens` tokens (a measured mean from an eval run, or an expectation),
    instead of their upper bound. The first adaptive stage hands on `tokens` (clamped to
    its range); every adaptive stage sits at the same fraction of its own range; a fixed
    count never exceeds what enters it. Without adaptive stages: the plan's counts."""
    spec = plan.spec
    first = next((s for s in plan.stages if s.tokens_out_min is not None), None)
    if first is None:
        return list(plan.vit_tokens), plan.projector_tokens, list(plan.llm_visual)
    span = first.tokens_out - first.fewest_out
    frac = min(max((tokens - first.fewest_out) / span, 0.0), 1.0) if span else 1.0
    walk = _ExpectedWalk(spec)
    for stage in plan.stages:
        out = stage.tokens_out
        if stage.tokens_out_min is not None:
            out = round(stage.fewest_out + frac * (stage.tokens_out - stage.fewest_out))
        walk.leave(stage.site, min(out, walk.entering(stage.site)))
    return walk.result()


class _ExpectedWalk:
    """The stream's counts stage by stage (the rules of vtdsl.ir.passes.infer_tokens)."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.cls = 1 if spec.has_cls else 0
        self.vit = [spec.vit_tokens] * spec.vit.layers
        self.patches = self.features = spec.patch_tokens
        self.units = spec.vit_units  # merge-unit towers count merge units at ViT sites
        if self.units > 1:
            self.patches = self.features = self.merged = spec.llm_grid[0] * spec.llm_grid[1]
        self.llm: list[int] | None = None

    def _projector(self) -> int:
        return self.spec.projector_input(self.features)

    def entering(self, site) -> int:
        if site.tower == "vit":
            return self.patches if site.layer is not None else self.features
        if self.llm is None:
            self.llm = [self.spec.llm_entry_tokens(self._projector())] * self.spec.llm.layers
        return self.llm[site.layer]

    def leave(self, site, out: int) -> None:
        spec = self.spec
        if site.tower == "vit" and site.layer is not None:
            self.patches = out
            self.vit[site.layer:] = [out * self.units + self.cls] * (spec.vit.layers - site.layer)
            if site.layer <= spec.feature_layer_index + 1:
                self.features = self.merged = out
        elif site.tower == "vit":
            self.features = out
        else:
            self.llm[site.layer:] = [out] * (spec.llm.layers - site.layer)

    def result(self) -> tuple[list[int], int, list[int]]:
        projector = self._projector()
        llm = self.llm or [self.spec.llm_entry_tokens(projector)] * self.spec.llm.layers
        if self.spec.packed_units:  # the merger runs before vit.out: on the units the blocks hand on
            projector = self.merged * self.spec.vit_crops
        return self.vit, projector, llm


def estimate_expected(plan, tokens: int, text_tokens: int = 64, logits: Logits = "last",
                      decode_context: int | None = None):
    """`estimate(plan)` with the adaptive stages keeping `tokens` on average
    (`expected_counts`); scorer extras stay charged at their bound."""
    vit, projector, llm = expected_counts(plan, tokens)
    return estimate_counts(plan.spec, vit, projector, llm, text_tokens, observations=plan.observations,
                           stages=plan.stages, logits=logits, decode_context=decode_context)
