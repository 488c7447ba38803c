"""IR passes. Each is a pure function `graph -> graph` (the input is never mutated).

`RULES` lists them in order; `run_passes` fills each rule's keyword arguments from its
signature (sqlglot-style), so adding a pass means adding a function to `RULES`.
Every finding is a located `Diagnostic` appended to `graph.graph["diagnostics"]`; the
driver stops after a pass that reported an error, since later passes need its results.
"""

from __future__ import annotations

import inspect
import math
from fractions import Fraction

import networkx as nx

from ..lang import ast
from ..lang.errors import Diagnostic, did_you_mean
from ..lang.scorers import SCORERS
from ..models.spec import ModelSpec
from .graph import iter_score_refs, observations_of, stage_node, stream, stream_nodes
from .plan import Observation, ResolvedAdaptive, ResolvedScore, ResolvedSite, ResolvedStage, ResolvedTerm

# Scorer meaning (towers, canonical runtime scorer, query rows) lives with the syntax in
# vtdsl.lang.scorers.SCORERS, the one place a scorer is added.
TOWER_NAMES = {"vit": "ViT", "llm": "LLM"}


def _error(graph: nx.DiGraph, message: str, span, **kw) -> None:
    graph.graph["diagnostics"].append(Diagnostic(message, span, **kw))


def _warn(graph: nx.DiGraph, message: str, span, **kw) -> None:
    graph.graph["diagnostics"].append(Diagnostic(message, span, severity="warning", **kw))


def _copy(graph: nx.DiGraph) -> nx.DiGraph:
    new = graph.copy()
    new.graph["diagnostics"] = list(graph.graph["diagnostics"])
    return new


def has_errors(graph: nx.DiGraph) -> bool:
    return any(d.severity == "error" for d in graph.graph["diagnostics"])


def _layer_count(spec: ModelSpec, tower: str) -> int:
    return spec.vit.layers if tower == "vit" else spec.llm.layers


def _order_key(site: ResolvedSite, spec: ModelSpec, observed: bool = False) -> tuple:
    """Execution-order key. An observation at layer l happens inside l: after the token
    set entering l is fixed and before the stage entering l+1. `vit.out` comes after
    every ViT layer and before the LLM."""
    if site.tower == "vit" and site.layer is None:
        return (1, 0, 0)
    tower_rank = 0 if site.tower == "vit" else 2
    return (tower_rank, site.layer, 1 if observed else 0)


def _resolve_site(graph, spec: ModelSpec, site: ast.Site, what: str) -> ResolvedSite | None:
    if site.index is None:
        return ResolvedSite("vit", None)
    count = _layer_count(spec, site.tower)
    index = site.index + count if site.index < 0 else site.index
    if not 0 <= index < count:
        _error(
            graph,
            f"{site.text()} is out of range: {spec.name}'s {TOWER_NAMES[site.tower]} has layers "
            f"0..{count - 1} (or -{count}..-1 from the end)",
            site.span,
            expected=f"a {site.tower} layer between 0 and {count - 1}",
            code="site-range",
        )
        return None
    return ResolvedSite(site.tower, index)


def _has_range(score) -> bool:
    if isinstance(score, ast.ScoreCombine):
        return score.to is not None or any(_has_range(a) for a in score.args)
    return score.to is not None


def _range_layers(probe: nx.DiGraph, spec: ModelSpec, score) -> range | None:
    """The layers of a score's range `@tower.layerA..B` (None on error)."""
    end = ast.Site(tower=score.at.tower, index=score.to, span=score.at.span)
    first = _resolve_site(probe, spec, score.at, "score")
    last = _resolve_site(probe, spec, end, "score")
    if first is None or last is None:
        return None
    if last.layer < first.layer:
        _error(probe, f"the layer range runs backwards: layer {last.layer} comes before layer {first.layer}",
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
            _error(probe, "a layer range inside a ranged combination", score.at.span,
                   expected="one range, on the outer combination", code="score-range")
            return None
        args = [_at_layer(probe, a, tower, layer, span) for a in score.args]
        return None if any(a is None for a in args) else score.model_copy(update={"args": args})
    if score.at is not None:
        _error(probe, f"'{score.name}@{score.at.text()}' names its own layer inside a ranged combination, which "
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
        start, end = stage.site, stage.repeat.end
        if start.index is None or end.index is None:
            bad = start if start.index is None else end
            _error(probe, "vit.out is one site, not a layer a schedule can step through", bad.span,
                   expected="a schedule over vit.layerN or llm.layerN sites", code="repeat")
            continue
        if start.tower != end.tower:
            _error(probe, f"a schedule stays in one tower: {start.text()} is in the {TOWER_NAMES[start.tower]}, "
                   f"{end.text()} in the {TOWER_NAMES[end.tower]}", end.span,
                   expected=f"a {start.tower}.layerN site", code="repeat")
            continue
        first = _resolve_site(probe, spec, start, "stage")
        last = _resolve_site(probe, spec, end, "stage")
        if first is None or last is None:
            continue
        if last.layer < first.layer:
            _error(probe, f"the schedule runs backwards: {end.text()} (layer {last.layer}) comes before "
                   f"{start.text()} (layer {first.layer})", end.span,
                   expected=f"a site at or after {start.text()}", code="repeat")
            continue
        layers = range(first.layer, last.layer + 1, stage.repeat.step)
        if isinstance(stage.action, ast.DropAll) and len(layers) > 1:
            _error(probe, "'drop all' ends the visual stream: a schedule cannot repeat it", stage.action.span,
                   expected=f"'at {start.text()} drop all'", code="repeat")
            continue
        for layer in layers:
            site = ast.Site(tower=start.tower, index=layer, span=start.span)
            # a copy per layer: the IR keys each score it reads by the score's node, so
            # stages sharing one node would all read the last layer's observation
            stages.append(ast.Stage(site=site, action=stage.action.model_copy(deep=True), span=stage.span,
                                    renumber=stage.renumber, renumber_span=stage.renumber_span))
    return policy.model_copy(update={"stages": stages}), probe.graph["diagnostics"]


def resolve_sites(graph: nx.DiGraph, spec: ModelSpec) -> nx.DiGraph:
    """Give every stage and observation a concrete, non-negative site.

    A score without `@` is read from the last layer that ran before the stage's site:
    layer N-1 at `vit.layerN` / `llm.layerN`, the feature layer at `vit.out`. `@vit.out`
    means the feature layer.
    """
    graph = _copy(graph)
    graph.graph["spec"] = spec
    policy: ast.Policy = graph.graph["policy"]
    if policy.model and policy.model != spec.name:
        _warn(
            graph,
            f"policy was written for model '{policy.model}' but is checked against '{spec.name}'",
            policy.model_span or policy.span,
            code="model-hint",
        )
    for node in stream(graph):
        data = graph.nodes[node]
        site = _resolve_site(graph, spec, data["stage"].site, "stage")
        data["site"] = site
        if site is not None:
            data["order"] = _order_key(site, spec)
    for node, data in list(graph.nodes(data=True)):
        if data["kind"] != "observe":
            continue
        ref: ast.ScoreRef = data["score"]
        stage_data = graph.nodes[stage_node(data["stage_index"])]
        meaning = SCORERS.get(ref.name)
        if meaning is None:
            _error(
                graph,
                f"unknown scorer '{ref.name}'",
                ref.span,
                expected="a scorer: " + ", ".join(SCORERS),
                hint=did_you_mean(ref.name, SCORERS),
                code="scorer",
            )
            continue
        args = tuple(ref.args) or meaning.default_args
        if args not in meaning.queries:
            allowed = [f"{ref.name}({', '.join(a)})" if a else ref.name for a in meaning.queries]
            _error(
                graph,
                f"'{ref.name}' does not take the arguments ({', '.join(args)})",
                ref.span,
                expected=" or ".join(allowed),
                code="scorer-args",
            )
            continue
        on_input = False
        if ref.at is not None:
            site = _resolve_site(graph, spec, ref.at, "score")
            if site is None:
                continue
            layer = spec.feature_layer_index if site.layer is None else site.layer
            obs_site = ResolvedSite(site.tower, layer)
            stage_site = stage_data.get("site")
            on_input = (stage_site is not None and site.tower == "llm" == stage_site.tower
                        and layer == stage_site.layer and meaning.canonical != "norm")
            if on_input and layer == 0:
                _error(
                    graph,
                    f"'{_ref_text(ref)}' would score llm.layer0 on its input, the token embeddings; "
                    "scores on a layer's own input are read from llm.layer1 on",
                    ref.span,
                    expected="a score of an LLM layer >= 1, or a score-free selector such as diverse",
                    code="observe-order",
                )
                continue
        else:
            stage_site = stage_data.get("site")
            if stage_site is None:
                continue
            if stage_site.layer is None:
                obs_site = ResolvedSite("vit", spec.feature_layer_index)
            else:
                obs_site = ResolvedSite(stage_site.tower, stage_site.layer - 1)
                if obs_site.layer < 0 and meaning.canonical != "norm":
                    _error(
                        graph,
                        f"no {TOWER_NAMES[stage_site.tower]} layer has run before {stage_site.text()}, "
                        f"so '{ref.name}' has no attention to read there",
                        ref.span,
                        expected=f"a score read from an earlier layer ({ref.name}@vit.layerN) "
                        "or a score-free selector such as diverse, uniform or random",
                        code="observe-order",
                    )
                    continue
        data["observation"] = Observation(
            scorer=meaning.canonical,
            args=args,
            tower=obs_site.tower,
            layer=obs_site.layer,
            queries=meaning.queries[args],
            on_input=on_input,
            heads=ref.heads or "mean",
            rope=not ref.no_rope,
            image_keys=ref.image_keys,
        )
        # read on the layer's input: before the stage entering that layer
        data["order"] = (2, obs_site.layer, -1) if on_input else _order_key(obs_site, spec, observed=True)
    return graph


def validate(graph: nx.DiGraph, spec: ModelSpec) -> nx.DiGraph:
    """Static checks that need resolved sites but no token counts."""
    graph = _copy(graph)
    previous_key, previous_site, dropped_at, cls_kept_at = None, None, None, None
    feature_entry = spec.feature_layer_index + 1  # the token set that becomes the features
    for node in stream(graph):
        data = graph.nodes[node]
        stage: ast.Stage = data["stage"]
        site: ResolvedSite = data["site"]
        if dropped_at is not None:
            _error(
                graph,
                f"no visual tokens are left at {stage.site.text()}: 'drop all' at {dropped_at} "
                "ended the visual stream",
                stage.span,
                expected="no stage after 'drop all'",
                code="after-drop",
            )
        if previous_key is not None and data["order"] < previous_key:
            _error(
                graph,
                f"stage at {stage.site.text()} runs before the previous stage at {previous_site}; "
                "write stages in execution order (vit layers, vit.out, then llm layers)",
                stage.site.span,
                expected=f"a site at or after {previous_site}",
                code="stage-order",
            )
        if site.tower == "vit" and site.layer is not None and site.layer > feature_entry:
            _warn(
                graph,
                f"{stage.site.text()} comes after the feature layer (vit.layer{spec.feature_layer_index}, "
                f"vision_feature_layer={spec.vision_feature_layer}): it only saves compute in "
                "layers whose output is unused and does not change the image features",
                stage.site.span,
                code="after-features",
            )
        if isinstance(stage.action, ast.Keep):
            _validate_cls_token(graph, spec, stage, site, cls_kept_at)
            if any(isinstance(t, ast.ClsTokenTerm) for t in stage.action.terms):
                cls_kept_at = cls_kept_at or stage.site.text()
        elif cls_kept_at is not None and site.tower == "vit":
            _error(graph, f"'{stage.action.kind}' at vit.out after 'cls_token' was kept at {cls_kept_at} would treat "
                   "the CLS token as a patch", stage.span, expected="'cls_token' in the last vit.out stage",
                   code="cls-token")
        if stage.renumber and site.tower == "vit":
            _error(graph, f"'renumber' re-numbers the LLM's rotary positions; {stage.site.text()} is in the vision "
                   "tower, whose position embeddings were added before its first layer",
                   stage.renumber_span or stage.span, expected="'renumber' on an llm.layerN stage",
                   code="renumber")
        elif stage.renumber and spec.position_encoding == "mrope":
            _error(graph, f"{spec.name} gives visual tokens 3-D M-RoPE positions (time, row, column), which have no "
                   "contiguous re-numbering; kept tokens keep their positions", stage.renumber_span or stage.span,
                   expected="the stage without 'renumber'", code="renumber")
        if isinstance(stage.action, ast.DropAll):
            dropped_at = stage.site.text()
        previous_key, previous_site = data["order"], stage.site.text()
        _validate_layout(graph, spec, stage, site)
        for obs_node in observations_of(graph, data["index"]):
            obs_data = graph.nodes[obs_node]
            if "observation" not in obs_data:
                continue
            _validate_observation(graph, spec, obs_data, data)
    return graph


def _validate_layout(graph, spec: ModelSpec, stage: ast.Stage, site: ResolvedSite) -> None:
    """What a model family's token layout rules out (docs/language.md, "Model families").

    - A patch merger (Qwen2.5-VL) takes 2x2 groups of ViT patches in window order: a ViT
      stage would have to keep whole groups, which no selector guarantees, so ViT stages
      are refused there (prune the merged tokens at llm.layer0 instead).
    - Anyres (LLaVA-NeXT): the LLM's visual tokens are the base view, the unpadded grid
      crops and newline tokens, not one grid; spatial selectors there are refused.
    """
    if site.tower == "vit" and spec.spatial_merge > 1:
        m = spec.spatial_merge
        _error(graph, f"{spec.name} merges {m}x{m} groups of ViT patches into one token after the vision tower; "
               f"a stage at {site.text()} would have to keep whole {m}x{m} groups, which vtdsl does not do",
               stage.site.span, expected="an llm.layerN site (llm.layer0 prunes the merged tokens before the LLM)",
               code="model-layout")
        return
    if site.tower != "llm" or spec.anyres_grid is None:
        return
    action = stage.action
    why = (f"on {spec.name} the LLM's visual tokens are a base view, unpadded crops and newline tokens, "
           "not one token grid")
    expected = "a non-spatial selector (top, diverse, uniform, random, unique) or 'per crop'"
    if isinstance(action, ast.Pool):
        _error(graph, f"'pool' at {site.text()}: {why}", action.span, expected="pool at vit.out (per crop)",
               code="model-layout")
    elif isinstance(action, ast.Keep):
        for term in action.terms:
            if isinstance(term, ast.BuffersTerm):
                _error(graph, f"'buffers' at {site.text()}: {why}", term.span, expected=expected, code="model-layout")
        if action.region is not None and action.region.kind == "region":
            _error(graph, f"'per region' at {site.text()}: {why}", action.region.span, expected=expected,
                   code="model-layout")


def _validate_cls_token(graph, spec: ModelSpec, stage: ast.Stage, site: ResolvedSite, kept_at: str | None) -> None:
    """`cls_token` exists for one case: a vit.out where the select strategy dropped CLS."""
    terms = [t for t in stage.action.terms if isinstance(t, ast.ClsTokenTerm)]
    if not terms:
        if kept_at is not None and site.tower == "vit":
            _error(graph, f"a vit.out stage after 'cls_token' was kept at {kept_at} would treat the CLS token "
                   "as a patch", stage.span, expected="'cls_token' in the last vit.out stage", code="cls-token")
        return
    expected = "'cls_token' only at vit.out, once"
    if len(terms) > 1:
        _error(graph, "'cls_token' appears twice in one stage", terms[1].span, expected=expected, code="cls-token")
    term = terms[0]
    if not spec.has_cls:
        message = f"model '{spec.name}' has no CLS token, so 'cls_token' cannot keep one"
    elif site.tower == "llm":
        message = f"'cls_token' keeps the CLS token at vit.out; at {site.text()} the LLM only sees what the projector received"
    elif site.layer is not None:
        message = f"inside the ViT the CLS token is always kept; 'cls_token' belongs to vit.out, not {site.text()}"
    elif spec.select_strategy != "default":
        message = (f"the CLS token already reaches the projector on '{spec.name}' (select strategy "
                   f"'{spec.select_strategy}'); 'cls_token' is only for the 'default' strategy, which drops it")
    elif kept_at is not None:
        message = f"the CLS token was already kept at {kept_at}"
    else:
        return
    _error(graph, message, term.span, expected=expected, code="cls-token")


def _validate_observation(graph, spec: ModelSpec, obs_data: dict, stage_data: dict) -> None:
    ref: ast.ScoreRef = obs_data["score"]
    obs: Observation = obs_data["observation"]
    meaning = SCORERS[ref.name]
    stage_site: ResolvedSite = stage_data["site"]
    where = f"{obs.tower}.layer{obs.layer}"
    if obs.tower not in meaning.towers:
        if ref.name == "text":
            message = f"'text' reads attention from text tokens, which exist only inside the LLM (not at {where})"
        else:
            message = f"'{ref.name}' is only available at ViT layers (the LLM sees no CLS token), not at {where}"
        _error(graph, message, ref.span, expected="a score valid at " + where, code="scorer-site")
        return
    if obs.image_keys and obs.tower == "vit":
        _error(graph, f"'image_keys' restricts an LLM attention to the image tokens' keys; at {where} every key is "
               "a patch", ref.span, expected=f"'{ref.name}' without image_keys", code="scorer-args")
        return
    if not obs.rope and obs.tower == "vit":
        _error(graph, f"the ViT has no rotary position embeddings: 'no_rope' changes nothing at {where}", ref.span,
               expected=f"'{ref.name}' without no_rope", code="scorer-args")
        return
    if obs.scorer == "knorm" and obs.on_input:
        _error(graph, f"'{ref.name}' reads the keys a layer computed; at the stage entering {where} they do not "
               "exist yet", ref.span, expected=f"knorm@{obs.tower}.layer{obs.layer - 1} (the layer before)",
               code="observe-order")
        return
    if isinstance(obs.heads, int):
        tower = spec.vit if obs.tower == "vit" else spec.llm
        if obs.heads > tower.heads:
            _error(graph, f"'top {obs.heads} heads' asks for more heads than {spec.name}'s {TOWER_NAMES[obs.tower]} has "
                   f"({tower.heads})", ref.span, expected=f"at most {tower.heads} heads", code="scorer-args")
            return
    if obs.queries == "visual" and obs.tower == "vit":
        _error(graph, f"in the ViT every query is a visual token: 'attn(visual)' is 'attn' at {where}", ref.span,
               expected="attn", code="scorer-args")
        return
    if obs.scorer in ("cls", "vsim") and not spec.has_cls:
        _error(
            graph,
            f"{spec.name}'s vision tower has no CLS token, so '{ref.name}' has nothing to read",
            ref.span,
            expected="an LLM score such as text or attn" if spec.spatial_merge > 1 else "a score such as attn or norm",
            code="no-cls",
        )
        return
    if obs.tower == "vit" and spec.spatial_merge > 1:
        _error(graph, f"{spec.name}'s vision tower orders patches by attention window and merges them "
               f"{spec.spatial_merge}x{spec.spatial_merge} before the LLM; vtdsl reads no ViT scores there",
               ref.span, expected="an LLM score such as text@llm.layer2", code="model-layout")
        return
    if obs.tower == "vit" and stage_site.tower == "llm" and spec.anyres_grid is not None:
        _error(graph, f"'{_ref_text(ref)}' scores ViT crop patches, but the stage at {stage_site.text()} chooses "
               f"among {spec.name}'s packed LLM tokens (base view, unpadded crops, newline tokens)",
               ref.span, expected="an LLM score such as text@llm.layer2, or the stage at vit.out", code="model-layout")
        return
    if obs_data["order"] >= stage_data["order"]:
        _error(
            graph,
            f"'{_ref_text(ref)}' is read at {where}, which runs after the stage at "
            f"{stage_site.text()} has already chosen its tokens",
            ref.span,
            expected=f"an observation before {stage_site.text()}",
            code="observe-order",
        )


def _ref_text(ref: ast.ScoreRef) -> str:
    text = ref.name + (f"({', '.join(ref.args)})" if ref.args else "")
    return text + (f"@{ref.at.text()}" if ref.at else "")


def resolve_quantity(qty: ast.Quantity, tokens_in: int) -> int:
    """A count as written, or `floor(n * p / 100 + 1/2)` computed exactly for a percent."""
    if not qty.percent:
        return int(qty.value)
    exact = Fraction(str(qty.value)) * tokens_in / 100 + Fraction(1, 2)
    return math.floor(exact)


def _resolve_score(graph, score, obs_by_ref: dict) -> ResolvedScore:
    if isinstance(score, ast.ScoreRef):
        return ResolvedScore("leaf", obs_by_ref[id(score)])
    return ResolvedScore(score.op, args=tuple(_resolve_score(graph, a, obs_by_ref) for a in score.args),
                         weights=tuple(score.weights) if score.weights is not None else None)


def infer_tokens(graph: nx.DiGraph, spec: ModelSpec) -> nx.DiGraph:
    """Count the visual tokens at every ViT and LLM layer and check every quantity."""
    graph = _copy(graph)
    cls = 1 if spec.has_cls else 0
    vit_tokens = [spec.vit_tokens] * spec.vit.layers
    feature_entry = spec.feature_layer_index + 1
    patches = spec.patch_tokens  # tokens in the ViT stream now
    feature_patches = patches  # what the feature layer hands over
    grid: tuple[int, int] | None = spec.grid
    features: int | None = None  # after vit.out stages
    llm_visual: list[int] | None = None
    obs_by_ref = {
        id(d["score"]): d["observation"]
        for _, d in graph.nodes(data=True)
        if d["kind"] == "observe" and "observation" in d
    }
    # the fewest tokens each count can be after adaptive stages (`top N by ...`), and the
    # stage that made them vary (None: counts are exact)
    patches_min = feature_patches_min = patches
    features_min: int | None = None
    llm_min: list[int] | None = None
    varies_from: str | None = None
    for node in stream(graph):
        data = graph.nodes[node]
        site: ResolvedSite = data["site"]
        if site.tower == "vit" and site.layer is not None:
            tokens_in, tokens_min = patches, patches_min
        elif site.tower == "vit":
            if features is None:
                features, features_min = feature_patches, feature_patches_min
            tokens_in, tokens_min = features, features_min
        else:
            if llm_visual is None:
                if features is None:
                    features, features_min = feature_patches, feature_patches_min
                llm_visual = [spec.llm_entry_tokens(_to_projector(features, spec))] * spec.llm.layers
                llm_min = [spec.llm_entry_tokens(_to_projector(features_min, spec))] * spec.llm.layers
                # the LLM's token grid: one crop's, merged (Qwen2.5-VL); none for anyres
                if spec.anyres_grid is not None:
                    grid = None
                elif grid is not None and spec.spatial_merge > 1:
                    grid = spec.llm_grid
            tokens_in, tokens_min = llm_visual[site.layer], llm_min[site.layer]
        resolved = _infer_stage(graph, data, tokens_in, grid, obs_by_ref, tokens_min, varies_from)
        if resolved is None:
            return graph
        stage, grid = resolved
        data["resolved"] = stage
        out, out_min = stage.tokens_out, stage.fewest_out
        if out_min != out and varies_from is None:
            varies_from = site.text()
        if site.tower == "vit" and site.layer is not None:
            patches, patches_min = out, out_min
            vit_tokens[site.layer :] = [out + cls] * (spec.vit.layers - site.layer)
            if site.layer <= feature_entry:
                feature_patches, feature_patches_min = out, out_min
        elif site.tower == "vit":
            features, features_min = out, out_min
        else:
            llm_visual[site.layer :] = [out] * (spec.llm.layers - site.layer)
            llm_min[site.layer :] = [out_min] * (spec.llm.layers - site.layer)
    if features is None:
        features = feature_patches
    projector_tokens = _to_projector(features, spec)
    if llm_visual is None:
        llm_visual = [spec.llm_entry_tokens(projector_tokens)] * spec.llm.layers
    _annotate_stream(graph)
    graph.graph["vit_tokens"] = vit_tokens
    graph.graph["projector_tokens"] = projector_tokens
    graph.graph["image_placeholders"] = spec.llm_entry_tokens(projector_tokens)
    graph.graph["llm_visual"] = llm_visual
    return graph


def _to_projector(features: int, spec: ModelSpec) -> int:
    """Visual tokens one image hands the projector, from the patch tokens one crop's
    feature layer hands over: merged in groups of spatial_merge x spatial_merge
    (Qwen2.5-VL), CLS added back under the "full" strategy, times the crops (LLaVA-NeXT).
    With nothing pruned this is `spec.projector_tokens`."""
    keeps_cls = spec.has_cls and spec.select_strategy == "full"
    return (features // spec.spatial_merge**2 + (1 if keeps_cls else 0)) * spec.vit_crops


def _annotate_stream(graph: nx.DiGraph) -> None:
    """Put the token count flowing along each stream edge on the edge (`tokens`)."""
    nodes = stream_nodes(graph)
    tokens = None
    for before, after in zip(nodes, nodes[1:]):
        data = graph.nodes[after]
        stage = graph.nodes[stage_node(data["index"])]["resolved"] if "index" in data else None
        if data["kind"] == "stage":
            tokens = stage.tokens_in
        graph.edges[before, after]["tokens"] = tokens
        if data["kind"] == "select":
            tokens = (stage.tokens_out - stage.merge_rest - (stage.recycle[1] if stage.recycle else 0)
                      - (1 if stage.absorb else 0) - (stage.cells[0] * stage.cells[1] if stage.cells else 0))
        elif data["kind"] in ("merge", "drop"):
            tokens = stage.tokens_out
    # the sink edge carries what the last stage handed on (None: no stages)


def _percent_of_varying(graph, action, varies_from: str) -> bool:
    """Refuse a percentage of a token count that varies per image (after an adaptive
    stage): it would resolve to a different count per image. True if one was found."""
    found = []
    if isinstance(action, ast.Merge):
        found.append(action.pairs)
    elif isinstance(action, ast.Keep):
        found += [t.qty for t in action.terms if getattr(t, "qty", None) is not None]
        found += [q for q in (action.merge_rest, action.absorb) if q is not None]
        if action.recycle is not None:
            found.append(action.recycle.count)
    for qty in found:
        if qty.percent:
            _error(graph, f"'{_qty_text(qty)}' is a share of the tokens entering this stage, whose count varies per "
                   f"image after the adaptive count at {varies_from}", qty.span,
                   expected="a number of tokens", code="adaptive")
            return True
    return False


def _infer_stage(graph, data: dict, tokens_in: int, grid, obs_by_ref, tokens_min: int | None = None,
                 varies_from: str | None = None):
    """Resolve one stage's counts. `tokens_in` is what enters (the most, after adaptive
    stages), `tokens_min` the fewest; every quantity must fit the fewest."""
    stage: ast.Stage = data["stage"]
    action = stage.action
    site: ResolvedSite = data["site"]
    fewest = tokens_in if tokens_min is None else tokens_min
    varies = fewest != tokens_in
    if varies and _percent_of_varying(graph, action, varies_from or "an earlier stage"):
        return None
    common = dict(index=data["index"], site=site, tokens_in=tokens_in, span=stage.span, renumber=stage.renumber,
                  tokens_in_min=fewest if varies else None)
    entering = f"{tokens_in} enter this stage at {site.text()}" if not varies else \
        f"as few as {fewest} enter this stage at {site.text()}"
    if isinstance(action, ast.DropAll):
        return ResolvedStage(action="drop", tokens_out=0, **common), None
    if isinstance(action, ast.Pool):
        if grid is None:
            _error(
                graph,
                f"'pool {action.rows}x{action.cols}' needs the full token grid, but an earlier stage "
                "already pruned or merged it",
                action.span,
                expected="pool before any keep or merge stage",
                code="pool-grid",
            )
            return None
        rows, cols = math.ceil(grid[0] / action.rows), math.ceil(grid[1] / action.cols)
        stage_out = ResolvedStage(
            action="pool", tokens_out=rows * cols, pool=(action.rows, action.cols), **common
        )
        return stage_out, (rows, cols)
    if isinstance(action, ast.Merge):
        pairs = resolve_quantity(action.pairs, tokens_in)
        if pairs > fewest // 2:
            _error(
                graph,
                f"'merge {_qty_text(action.pairs)}' asks for {pairs} merged pairs, but "
                f"{'as few as ' if varies else ''}{fewest} tokens enter this stage: "
                f"at most {fewest // 2} pairs can be merged",
                action.pairs.span,
                expected=f"at most {fewest // 2} pairs",
                code="quantity",
            )
            return None
        stage_out = ResolvedStage(action="merge", tokens_out=tokens_in - pairs, merge_rest=pairs,
                                  tokens_out_min=fewest - pairs if varies else None, **common)
        return stage_out, (grid if pairs == 0 else None)
    # keep: `kept` counts the most the terms so far can keep, `kept_min` the fewest
    kept, kept_min, terms, ok = 0, 0, [], True
    keep_cls = any(isinstance(t, ast.ClsTokenTerm) for t in action.terms)
    adaptive_seen = False
    for term in action.terms:
        if isinstance(term, ast.ClsTokenTerm):
            continue  # one token ahead of the kept patches, outside the selection
        available = fewest - kept  # what is surely left for this term
        adaptive = term.adaptive if isinstance(term, ast.TopTerm) else None
        if isinstance(term, ast.BuffersTerm):
            if term.qty is None and adaptive_seen:
                _error(graph, "'buffers' sizes itself by the tokens kept before it, whose count varies per image here",
                       term.span, expected="'buffers N' with a number, or no adaptive count before it",
                       code="adaptive")
                ok = False
                continue
            if term.qty is None:
                count = min(4 * kept, available)
            else:
                count = resolve_quantity(term.qty, tokens_in)
        else:
            count = resolve_quantity(term.qty, tokens_in)
        far = {}
        if isinstance(term, ast.SelectTerm) and term.kind == "far":
            far = _resolve_far(graph, term, site, kept, adaptive_seen, action.region, obs_by_ref, count)
            if far is None:
                ok = False
                continue
            count = far["count"]  # rounded down to a multiple of the pivots
        sure = count
        if adaptive is not None and adaptive.kind == "outliers":
            count = min(count, tokens_in - kept_min)  # at run time: at most what is there
            sure = min(count, 1)  # only its one sure token must fit
        if sure > available:
            qty_span = term.qty.span if term.qty is not None else term.span
            earlier = f" after the earlier terms kept {kept}" if kept else ""
            _error(
                graph,
                f"'{term.kind if term.kind != 'top' else 'top'} {_qty_text(term.qty)}' asks for {count} tokens, "
                f"but only {available} remain{earlier} ({entering})",
                qty_span,
                expected=f"at most {available} tokens",
                code="quantity",
            )
            ok = False
            continue
        score = _resolve_score(graph, term.score, obs_by_ref) if isinstance(term, ast.TopTerm) else None
        seed = term.seed if isinstance(term, ast.SelectTerm) else None
        spread = term.spread if isinstance(term, ast.SelectTerm) else "min"
        resolved_adaptive, least = None, None
        if adaptive is not None:
            adaptive_seen = True
            counted = _resolve_score(graph, adaptive.score, obs_by_ref) if adaptive.score is not None else None
            resolved_adaptive = ResolvedAdaptive(adaptive.kind, count, adaptive.steps or 1, counted)
            if adaptive.kind == "outliers":
                least = min(1, count)  # at least one token (the best), at most N
            else:  # entropy: never below N, at most every token still available
                least, count = count, tokens_in - kept_min
        terms.append(ResolvedTerm(kind=term.kind, count=count, score=score, seed=seed, spread=spread, span=term.span,
                                  adaptive=resolved_adaptive, min_count=least,
                                  text_pivots=far.get("text_pivots", 0), pivot_score=far.get("pivot_score"),
                                  per_pivot=far.get("per_pivot", 0), normed=far.get("normed", False)))
        kept = min(kept + count, tokens_in)  # no stage keeps more than enters
        kept_min += count if least is None else least
    if not ok:
        return None
    leftover = fewest - kept  # tokens surely left over after the terms
    rest = 0
    if action.merge_rest is not None:
        rest = resolve_quantity(action.merge_rest, tokens_in)
        if rest > leftover:
            _error(
                graph,
                f"'merge rest into {_qty_text(action.merge_rest)}' asks for {rest} contextual tokens, but only "
                f"{leftover} tokens are left to merge",
                action.merge_rest.span,
                expected=f"at most {leftover} contextual tokens",
                code="quantity",
            )
            return None
    merge_keys = None
    if action.merge_rest is not None and action.merge_by == "keys":
        merge_keys = _resolve_merge_keys(graph, action, terms, site)
        if merge_keys is None:
            return None
    recycle = None
    if action.recycle is not None and adaptive_seen and action.recycle.count.percent:
        _error(graph, f"'recycle {_qty_text(action.recycle.count)}' is a share of the tokens this stage drops, whose "
               "count varies per image after the adaptive count before it", action.recycle.count.span,
               expected="a number of tokens", code="adaptive")
        return None
    if action.recycle is not None:
        recycle = _resolve_recycle(graph, action, terms, leftover)
        if recycle is None:
            return None
        rest = recycle[1]
    absorb = 0
    if action.absorb is not None:
        absorb = _resolve_absorb(graph, action, terms, fewest, kept)
        if not absorb:
            return None
        rest = 1  # the dropped tokens' weighted sum
    cells = None
    if action.cells is not None:
        cells = _resolve_cells(graph, action, terms, grid, kept)
        if cells is None:
            return None
        rest = cells[0] * cells[1]
    region = None
    proportional = action.region is not None and action.region.proportional
    if proportional and (not terms or terms[0].kind != "top"):
        first = next((t for t in action.terms if not isinstance(t, ast.ClsTokenTerm)), action.terms[0])
        _error(graph, "'proportional' shares the budget by each region's mean of the first term's score, "
               f"but the first term ('{first.kind}') has no score", first.span,
               expected="a scored first term, such as 'cls top 64 per region 4x4 proportional'", code="region")
        return None
    if action.region is not None:
        if adaptive_seen:
            _error(graph, "a count decided per image ('by ...') cannot also be split over regions", action.region.span,
                   expected="the stage without 'per ...', or a fixed count", code="adaptive")
            return None
        if action.region.kind == "chunk":
            region = ("chunk", action.region.chunks, 0)
            if action.region.chunks > fewest:
                _error(graph, f"'per chunk {action.region.chunks}' cuts {fewest} tokens into empty chunks",
                       action.region.span, expected=f"at most {fewest} chunks", code="region")
                return None
        else:
            region = (action.region.kind, action.region.rows or 0, action.region.cols or 0)
        if action.region.kind == "region" and grid is not None:
            if action.region.rows > grid[0] or action.region.cols > grid[1]:
                _error(
                    graph,
                    f"'per region {action.region.rows}x{action.region.cols}' splits a "
                    f"{grid[0]}x{grid[1]} token grid into empty regions",
                    action.region.span,
                    expected=f"at most {grid[0]}x{grid[1]} regions",
                    code="region",
                )
                return None
    out = kept + rest
    out_min = kept_min + rest
    stage_out = ResolvedStage(
        action="keep", tokens_out=out + keep_cls, terms=tuple(terms), region=region,
        merge_rest=rest if recycle is None and not absorb and cells is None else 0, recycle=recycle, absorb=absorb,
        cells=cells, keep_cls=keep_cls, region_proportional=proportional,
        merge_added=action.merge_added and action.merge_rest is not None, merge_keys=merge_keys,
        tokens_out_min=out_min + keep_cls if (out_min != out or varies) else None, **common
    )
    exact = out == tokens_in and out_min == out and not varies
    return stage_out, (grid if exact and rest == 0 and not keep_cls else None)


def _resolve_far(graph, term: ast.SelectTerm, site: ResolvedSite, kept: int, adaptive_seen: bool, region,
                 obs_by_ref, asked: int) -> dict | None:
    """`far q [with N text pivots by s]`: the pivots are the `kept` tokens of the earlier
    terms plus N text tokens; each takes q // pivots tokens (so q is rounded down to a
    multiple of the pivots)."""
    text = term.text_pivots or 0
    if term.normed and site.tower != "llm":
        _error(graph, f"far(norm) compares hidden states after the LLM's final norm; {site.text()} is in the vision "
               "tower", term.span, expected="'far' without (norm) in the vision tower", code="scorer-site")
        return None
    if text and site.tower != "llm":
        _error(graph, f"text pivots are text tokens, which exist only inside the LLM (not at {site.text()})",
               term.pivot_score.span, expected="'far' without text pivots in the vision tower", code="scorer-site")
        return None
    if adaptive_seen:
        _error(graph, "'far' takes its pivots from the tokens kept before it, whose count varies per image here",
               term.span, expected="a fixed count before 'far'", code="adaptive")
        return None
    if region is not None:
        _error(graph, "'far' compares every token with every pivot; it cannot also be split over regions",
               region.span, expected="the stage without 'per ...'", code="region")
        return None
    pivots = kept + text
    if pivots == 0:
        _error(graph, "'far' keeps the tokens least similar to its pivots, but there are none: no term before it "
               "keeps a token and it names no text pivots", term.span,
               expected="a term before it (knorm top 4 + far 64) or 'far 64 with 4 text pivots by knorm'",
               code="quantity")
        return None
    per = asked // pivots
    if per == 0:
        _error(graph, f"'far {_qty_text(term.qty)}' shares {asked} tokens among {pivots} pivots: none for each",
               term.qty.span, expected=f"at least {pivots} tokens", code="quantity")
        return None
    if term.pivot_score is not None:
        for ref in iter_score_refs(term.pivot_score):
            obs = obs_by_ref.get(id(ref))
            if obs is not None and obs.tower == "vit":
                _error(graph, f"text pivots are ranked among text tokens, which '{_ref_text(ref)}' (a ViT score) "
                       "does not score", ref.span, expected="an LLM score such as knorm or text(all)",
                       code="scorer-site")
                return None
    score = _resolve_score(graph, term.pivot_score, obs_by_ref) if term.pivot_score is not None else None
    return {"count": per * pivots, "per_pivot": per, "text_pivots": text, "pivot_score": score,
            "normed": term.normed}


def _first_term_unscored(graph, action: ast.Keep, terms: list, uses: str, example: str, code: str) -> bool:
    """Report (True) when the option needing the first term's score has none to read:
    `uses` says what it does with the score, `example` a stage that works."""
    if terms and terms[0].score is not None:
        return False
    first = next((t for t in action.terms if not isinstance(t, ast.ClsTokenTerm)), action.terms[0])
    _error(graph, f"{uses} the first term's score, but the first term ('{first.kind}') has no score", first.span,
           expected=f"a scored first term, such as '{example}'", code=code)
    return True


def _resolve_merge_keys(graph, action: ast.Keep, terms: list, site: ResolvedSite) -> int | None:
    """`... by keys`: the ViT layer whose keys the first term's score read (VisionZip
    matches on the keys of the layer its CLS attention comes from)."""
    where = action.merge_rest.span
    if site.tower != "vit":
        _error(graph, "'by keys' matches on a ViT layer's attention keys; this stage is in the LLM", where,
               expected="'then merge rest into N' without 'by keys'", code="merge-keys")
        return None
    score = terms[0].score if terms else None
    obs = score.observation if score is not None and score.op == "leaf" else None
    if obs is None or obs.tower != "vit" or obs.scorer not in ("cls", "attn", "knorm"):
        _error(graph, "'by keys' takes the keys of the layer the first term's score reads, so the first term must "
               "be one ViT attention score", where,
               expected="a first term such as 'cls top 161' (keys of the layer its attention comes from)",
               code="merge-keys")
        return None
    return obs.layer


def _band_sizes(length: int, parts: int) -> list[int]:
    """How many of `length` grid rows (columns) fall in each of `parts` bands, by the
    `per region` rule: row r is in band floor(r * parts / length)."""
    sizes = [0] * parts
    for r in range(length):
        sizes[r * parts // length] += 1
    return sizes


def _resolve_cells(graph, action: ast.Keep, terms: list, grid, kept: int) -> tuple[int, int] | None:
    """`then recycle rest into RxC cells`: the full token grid cut as `per region RxC`;
    every cell must keep a dropped token whatever the terms keep, so it has more tokens
    than they keep in all."""
    cells = action.cells
    if _first_term_unscored(graph, action, terms, "'recycle rest into cells' weights the dropped tokens by",
                            "cls top 64 then recycle rest into 2x2 cells", "recycle"):
        return None
    if grid is None:
        _error(graph, f"'recycle rest into {cells.rows}x{cells.cols} cells' needs the full token grid, but an earlier "
               "stage already pruned or merged it (or the model's visual tokens form no grid here)", cells.span,
               expected="cells in the first stage that cuts the grid", code="pool-grid")
        return None
    if cells.rows > grid[0] or cells.cols > grid[1]:
        _error(graph, f"'{cells.rows}x{cells.cols} cells' split a {grid[0]}x{grid[1]} token grid into empty cells",
               cells.span, expected=f"at most {grid[0]}x{grid[1]} cells", code="region")
        return None
    smallest = min(_band_sizes(grid[0], cells.rows)) * min(_band_sizes(grid[1], cells.cols))
    if smallest <= kept:
        _error(graph, f"a {cells.rows}x{cells.cols} cell can hold as few as {smallest} tokens, which the terms (keeping "
               f"{kept}) could all keep, leaving the cell nothing to recycle", cells.span,
               expected=f"cells of more than {kept} tokens (fewer, larger cells)", code="recycle")
        return None
    return cells.rows, cells.cols


def _resolve_absorb(graph, action: ast.Keep, terms: list, tokens_in: int, kept: int) -> int:
    """`then absorb K`: K of the tokens_in - 1 others (a percent: of them); the first
    term's score weights what is absorbed, and something must be dropped."""
    if _first_term_unscored(graph, action, terms, "'absorb' weights what each kept token takes in by",
                            "cls top 32 then absorb 32", "absorb"):
        return 0
    if kept >= tokens_in:
        _error(graph, f"'absorb' needs dropped tokens, but the terms keep all {tokens_in}", action.absorb.span,
               expected=f"terms keeping fewer than {tokens_in} tokens", code="absorb")
        return 0
    k = resolve_quantity(action.absorb, tokens_in - 1)
    if not 1 <= k <= tokens_in - 1:
        _error(graph, f"'absorb {_qty_text(action.absorb)}' asks each kept token for {k} neighbours among the "
               f"{tokens_in - 1} others", action.absorb.span, expected=f"between 1 and {tokens_in - 1}",
               code="quantity")
        return 0
    return k


def _resolve_recycle(graph, action: ast.Keep, terms: list, dropped: int) -> tuple[int, int] | None:
    """`then recycle N into M`: N of the `dropped` tokens (a percent: of them), M clusters
    (a percent: of the N); the first term's score ranks the dropped tokens."""
    rec = action.recycle
    if _first_term_unscored(graph, action, terms, "'recycle' ranks the dropped tokens by",
                            "text(all) top 300 then recycle 83 into 9", "recycle"):
        return None
    m = resolve_quantity(rec.count, dropped)
    if not 1 <= m <= dropped:
        _error(graph, f"'recycle {_qty_text(rec.count)}' asks for {m} of the {dropped} tokens this stage drops",
               rec.count.span, expected=f"between 1 and {dropped} tokens" if dropped else "a stage that drops tokens",
               code="quantity")
        return None
    c = resolve_quantity(rec.clusters, m)
    if not 1 <= c <= m:
        _error(graph, f"'into {_qty_text(rec.clusters)}' asks for {c} clusters of {m} recycled tokens",
               rec.clusters.span, expected=f"between 1 and {m} clusters", code="quantity")
        return None
    return m, c


def _qty_text(qty: ast.Quantity | None) -> str:
    if qty is None:
        return ""
    value = qty.value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value}%" if qty.percent else f"{value}"


RULES = (resolve_sites, validate, infer_tokens)


def run_passes(graph: nx.DiGraph, rules=RULES, **context) -> nx.DiGraph:
    """Apply `rules` in order, each getting the keyword arguments its signature names."""
    for rule in rules:
        wanted = inspect.signature(rule).parameters
        kwargs = {name: context[name] for name in wanted if name in context}
        graph = rule(graph, **kwargs)
        if has_errors(graph):
            break
    return graph
