"""Before lowering: unroll what is written once for many layers (schedules and
layer-range scores), so every pass sees plain stages and scores."""

from __future__ import annotations

import networkx as nx

from ...lang import ast
from ...lang.errors import Diagnostic
from ...models.spec import ModelSpec
from .common import TOWER_NAMES, error, resolve_site


def _has_range(score) -> bool:
    if isinstance(score, ast.ScoreCombine):
        return score.to is not None or any(_has_range(a) for a in score.args)
    return score.to is not None


def _range_layers(probe: nx.DiGraph, spec: ModelSpec, score) -> range | None:
    """The layers of a score's range `@tower.layerA..B` (None on error)."""
    end = ast.Site(tower=score.at.tower, index=score.to, span=score.at.span)
    first = resolve_site(probe, spec, score.at, "score")
    last = resolve_site(probe, spec, end, "score")
    if first is None or last is None:
        return None
    if last.layer < first.layer:
        error(probe, f"the layer range runs backwards: layer {last.layer} comes before layer {first.layer}",
              score.at.span, expected=f"a range from {score.at.text()} up", code="score-range")
        return None
    return range(first.layer, last.layer + 1)


def _aggregate(over: str, copies: list, span):
    """`over` of the per-layer copies; `ema` is FlowCut's running average (0.5): the
    last layer weighs 1/2, the one before 1/4, ..., the first as much as the second."""
    if len(copies) == 1:
        return copies[0]
    if over != "ema":
        return ast.ScoreCombine(op=over, args=copies, span=span)
    m = len(copies) - 1
    weights = [0.5**m] + [0.5 ** (m - i + 1) for i in range(1, m + 1)]
    return ast.ScoreCombine(op="sum", args=copies, weights=weights, span=span)


def _at_layer(probe: nx.DiGraph, score, tower: str, layer: int, span):
    """A copy of a ranged combination's body with every score read at `layer` (None if a
    score inside names its own layer or range: the range gives them all theirs)."""
    if isinstance(score, ast.ScoreCombine):
        if score.to is not None:
            error(probe, "a layer range inside a ranged combination", score.at.span,
                  expected="one range, on the outer combination", code="score-range")
            return None
        args = [_at_layer(probe, a, tower, layer, span) for a in score.args]
        return None if any(a is None for a in args) else score.model_copy(update={"args": args})
    if score.at is not None:
        error(probe, f"'{score.name}@{score.at.text()}' names its own layer inside a ranged combination, which "
              "reads every score at each layer of its range", score.at.span,
              expected=f"'{score.name}' without @", code="score-range")
        return None
    return score.model_copy(update={"at": ast.Site(tower=tower, index=layer, span=span)})


def _unroll_score(probe: nx.DiGraph, spec: ModelSpec, score):
    """`cls@vit.layer8..22 sum` -> `sum(cls@vit.layer8, ..., cls@vit.layer22)`, and a
    ranged combination `prod(a, b)@vit.layer0..3 ema` -> the weighted sum of its copies at
    each layer (None on error)."""
    if isinstance(score, ast.ScoreCombine):
        if score.to is not None:
            layers = _range_layers(probe, spec, score)
            if layers is None:
                return None
            body = score.model_copy(update={"at": None, "to": None, "over": None})
            copies = []
            for i in layers:  # the first copy reports what is wrong with the body, once
                copy = _at_layer(probe, body, score.at.tower, i, score.at.span)
                if copy is None:
                    return None
                copies.append(copy)
            return _aggregate(score.over, copies, score.span)
        args = [_unroll_score(probe, spec, a) for a in score.args]
        return None if any(a is None for a in args) else score.model_copy(update={"args": args})
    if score.to is None:
        return score
    layers = _range_layers(probe, spec, score)
    if layers is None:
        return None
    refs = [ast.ScoreRef(name=score.name, args=score.args, heads=score.heads, no_rope=score.no_rope,
                         image_keys=score.image_keys,
                         at=ast.Site(tower=score.at.tower, index=i, span=score.at.span),
                         span=score.span) for i in layers]
    return _aggregate(score.over, refs, score.span)


def _term_has_range(term) -> bool:
    if isinstance(term, ast.SelectTerm):
        return term.pivot_score is not None and _has_range(term.pivot_score)
    if not isinstance(term, ast.TopTerm):
        return False
    return _has_range(term.score) or (term.adaptive is not None and term.adaptive.score is not None
                                      and _has_range(term.adaptive.score))


def _stage_has_range(stage: ast.Stage) -> bool:
    return isinstance(stage.action, ast.Keep) and any(_term_has_range(t) for t in stage.action.terms)


def _unroll_ranges(probe: nx.DiGraph, spec: ModelSpec, stage: ast.Stage) -> ast.Stage | None:
    if not _stage_has_range(stage):
        return stage
    action = stage.action
    terms = []
    for term in action.terms:
        if isinstance(term, ast.SelectTerm) and _term_has_range(term):
            pivots = _unroll_score(probe, spec, term.pivot_score)
            if pivots is None:
                return None
            term = term.model_copy(update={"pivot_score": pivots})
        elif _term_has_range(term):
            score = _unroll_score(probe, spec, term.score) if _has_range(term.score) else term.score
            if score is None:
                return None
            update = {"score": score}
            if term.adaptive is not None and term.adaptive.score is not None and _has_range(term.adaptive.score):
                counted = _unroll_score(probe, spec, term.adaptive.score)
                if counted is None:
                    return None
                update["adaptive"] = term.adaptive.model_copy(update={"score": counted})
            term = term.model_copy(update=update)
        terms.append(term)
    return stage.model_copy(update={"action": action.model_copy(update={"terms": terms})})


def expand_repeats(policy: ast.Policy, spec: ModelSpec) -> tuple[ast.Policy, list[Diagnostic]]:
    """Unroll what is written once for many layers, against the model's layer counts
    (negative sites count from the end): every schedule (`every N layers from A to B
    <action>`) into one stage per layer A, A+N, ... <= B, and every layer-range score
    (`cls@vit.layer8..22 sum`) into its aggregate over the layers. Runs before lowering:
    every later pass sees plain stages and scores, carrying the spans of what was written.
    Percentages apply at each layer of a schedule to the tokens entering it."""
    if not any(s.repeat is not None or _stage_has_range(s) for s in policy.stages):
        return policy, []
    probe = nx.DiGraph(diagnostics=[])
    stages: list[ast.Stage] = []
    for stage in policy.stages:
        stage = _unroll_ranges(probe, spec, stage)
        if stage is None:
            continue
        if stage.repeat is None:
            stages.append(stage)
            continue
        layers = _schedule_layers(probe, spec, stage)
        if layers is None:
            continue
        for layer in layers:
            site = ast.Site(tower=stage.site.tower, index=layer, span=stage.site.span)
            # a copy per layer: the IR keys each score it reads by the score's node, so
            # stages sharing one node would all read the last layer's observation
            stages.append(ast.Stage(site=site, action=stage.action.model_copy(deep=True), span=stage.span,
                                    renumber=stage.renumber, renumber_span=stage.renumber_span))
    return policy.model_copy(update={"stages": stages}), probe.graph["diagnostics"]


def _schedule_layers(probe: nx.DiGraph, spec: ModelSpec, stage: ast.Stage) -> range | None:
    """The layers a schedule `every N layers from A to B` steps through (None: reported)."""
    start, end = stage.site, stage.repeat.end
    if start.index is None or end.index is None:
        bad = start if start.index is None else end
        error(probe, "vit.out is one site, not a layer a schedule can step through", bad.span,
              expected="a schedule over vit.layerN or llm.layerN sites", code="repeat")
        return None
    if start.tower != end.tower:
        error(probe, f"a schedule stays in one tower: {start.text()} is in the {TOWER_NAMES[start.tower]}, "
              f"{end.text()} in the {TOWER_NAMES[end.tower]}", end.span,
              expected=f"a {start.tower}.layerN site", code="repeat")
        return None
    first = resolve_site(probe, spec, start, "stage")
    last = resolve_site(probe, spec, end, "stage")
    if first is None or last is None:
        return None
    if last.layer < first.layer:
        error(probe, f"the schedule runs backwards: {end.text()} (layer {last.layer}) comes before "
              f"{start.text()} (layer {first.layer})", end.span,
              expected=f"a site at or after {start.text()}", code="repeat")
        return None
    layers = range(first.layer, last.layer + 1, stage.repeat.step)
    if isinstance(stage.action, ast.DropAll) and len(layers) > 1:
        error(probe, "'drop all' ends the visual stream: a schedule cannot repeat it", stage.action.span,
              expected=f"'at {start.text()} drop all'", code="repeat")
        return None
    return layers
