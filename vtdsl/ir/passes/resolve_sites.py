"""Pass: give every stage and observation a concrete site and an execution-order key."""

from __future__ import annotations

import networkx as nx

from ...lang import ast
from ...lang.errors import did_you_mean
from ...lang.scorers import SCORERS
from ...models.spec import ModelSpec
from ..graph import stage_node, stream
from ..plan import Observation, ResolvedSite
from .common import TOWER_NAMES, copy_graph, error, order_key, ref_text, resolve_site, warn

# Scorer meaning (towers, canonical runtime scorer, query rows) lives with the syntax in
# vtdsl.lang.scorers.SCORERS, the one place a scorer is added.


def resolve_sites(graph: nx.DiGraph, spec: ModelSpec) -> nx.DiGraph:
    """Give every stage and observation a concrete, non-negative site.

    A score without `@` is read from the last layer that ran before the stage's site:
    layer N-1 at `vit.layerN` / `llm.layerN`, the feature layer at `vit.out`. `@vit.out`
    means the feature layer.
    """
    graph = copy_graph(graph)
    graph.graph["spec"] = spec
    _warn_other_model(graph, spec)
    _resolve_stage_sites(graph, spec)
    for node, data in list(graph.nodes(data=True)):
        if data["kind"] == "observe":
            _resolve_observation(graph, spec, data)
    return graph


def _warn_other_model(graph: nx.DiGraph, spec: ModelSpec) -> None:
    policy: ast.Policy = graph.graph["policy"]
    if policy.model and policy.model != spec.name:
        warn(
            graph,
            f"policy was written for model '{policy.model}' but is checked against '{spec.name}'",
            policy.model_span or policy.span,
            code="model-hint",
        )


def _resolve_stage_sites(graph: nx.DiGraph, spec: ModelSpec) -> None:
    for node in stream(graph):
        data = graph.nodes[node]
        site = resolve_site(graph, spec, data["stage"].site, "stage")
        data["site"] = site
        if site is not None:
            data["order"] = order_key(site, spec)


def _resolve_observation(graph: nx.DiGraph, spec: ModelSpec, data: dict) -> None:
    """Fill an observe node's `observation` and `order` (nothing when it has an error)."""
    ref: ast.ScoreRef = data["score"]
    stage_site = graph.nodes[stage_node(data["stage_index"])].get("site")
    found = _scorer_meaning(graph, ref)
    if found is None:
        return
    meaning, args = found
    if ref.at is not None:
        placed = _written_site(graph, spec, ref, meaning, stage_site)
    else:
        placed = _site_before_stage(graph, spec, ref, meaning, stage_site)
    if placed is None:
        return
    obs_site, on_input = placed
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
    data["order"] = (2, obs_site.layer, -1) if on_input else order_key(obs_site, spec, observed=True)


def _scorer_meaning(graph: nx.DiGraph, ref: ast.ScoreRef):
    """The scorer's entry in SCORERS and the arguments it reads (None: reported)."""
    meaning = SCORERS.get(ref.name)
    if meaning is None:
        error(
            graph,
            f"unknown scorer '{ref.name}'",
            ref.span,
            expected="a scorer: " + ", ".join(SCORERS),
            hint=did_you_mean(ref.name, SCORERS),
            code="scorer",
        )
        return None
    args = tuple(ref.args) or meaning.default_args
    if args not in meaning.queries:
        allowed = [f"{ref.name}({', '.join(a)})" if a else ref.name for a in meaning.queries]
        error(
            graph,
            f"'{ref.name}' does not take the arguments ({', '.join(args)})",
            ref.span,
            expected=" or ".join(allowed),
            code="scorer-args",
        )
        return None
    return meaning, args


def _written_site(graph, spec: ModelSpec, ref: ast.ScoreRef, meaning, stage_site: ResolvedSite | None):
    """`score@site`: that layer (`vit.out`: the feature layer), and whether it is read on
    the input of the very LLM layer the stage enters (None: reported)."""
    site = resolve_site(graph, spec, ref.at, "score")
    if site is None:
        return None
    layer = spec.feature_layer_index if site.layer is None else site.layer
    on_input = (stage_site is not None and site.tower == "llm" == stage_site.tower
                and layer == stage_site.layer and not meaning.reads_layer_output)
    if on_input and layer == 0:
        error(
            graph,
            f"'{ref_text(ref)}' would score llm.layer0 on its input, the token embeddings; "
            "scores on a layer's own input are read from llm.layer1 on",
            ref.span,
            expected="a score of an LLM layer >= 1, or a score-free selector such as diverse",
            code="observe-order",
        )
        return None
    return ResolvedSite(site.tower, layer), on_input


def _site_before_stage(graph, spec: ModelSpec, ref: ast.ScoreRef, meaning, stage_site: ResolvedSite | None):
    """A score without `@`: the last layer that ran before the stage (None: reported, or
    the stage's own site was)."""
    if stage_site is None:
        return None
    if stage_site.layer is None:
        return ResolvedSite("vit", spec.feature_layer_index), False
    obs_site = ResolvedSite(stage_site.tower, stage_site.layer - 1)
    if obs_site.layer < 0 and not meaning.reads_layer_output:
        error(
            graph,
            f"no {TOWER_NAMES[stage_site.tower]} layer has run before {stage_site.text()}, "
            f"so '{ref.name}' has no attention to read there",
            ref.span,
            expected=f"a score read from an earlier layer ({ref.name}@vit.layerN) "
            "or a score-free selector such as diverse, uniform or random",
            code="observe-order",
        )
        return None
    return obs_site, False
