"""Pass: count the visual tokens at every layer and resolve every stage's quantities."""

from __future__ import annotations

import math

import networkx as nx

from ...lang import ast
from ...models.spec import ModelSpec
from ..graph import stage_node, stream, stream_nodes
from ..plan import ResolvedAdaptive, ResolvedSite, ResolvedStage, ResolvedTerm
from .common import copy_graph, error, qty_text, resolve_quantity, resolve_score
from .keep_options import resolve_absorb, resolve_cells, resolve_far, resolve_merge_keys, resolve_recycle


def infer_tokens(graph: nx.DiGraph, spec: ModelSpec) -> nx.DiGraph:
    """Count the visual tokens at every ViT and LLM layer and check every quantity."""
    graph = copy_graph(graph)
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
            error(graph, f"'{qty_text(qty)}' is a share of the tokens entering this stage, whose count varies per "
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
            error(
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
            error(
                graph,
                f"'merge {qty_text(action.pairs)}' asks for {pairs} merged pairs, but "
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
                error(graph, "'buffers' sizes itself by the tokens kept before it, whose count varies per image here",
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
            far = resolve_far(graph, term, site, kept, adaptive_seen, action.region, obs_by_ref, count)
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
            error(
                graph,
                f"'{term.kind if term.kind != 'top' else 'top'} {qty_text(term.qty)}' asks for {count} tokens, "
                f"but only {available} remain{earlier} ({entering})",
                qty_span,
                expected=f"at most {available} tokens",
                code="quantity",
            )
            ok = False
            continue
        score = resolve_score(graph, term.score, obs_by_ref) if isinstance(term, ast.TopTerm) else None
        seed = term.seed if isinstance(term, ast.SelectTerm) else None
        spread = term.spread if isinstance(term, ast.SelectTerm) else "min"
        resolved_adaptive, least = None, None
        if adaptive is not None:
            adaptive_seen = True
            counted = resolve_score(graph, adaptive.score, obs_by_ref) if adaptive.score is not None else None
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
            error(
                graph,
                f"'merge rest into {qty_text(action.merge_rest)}' asks for {rest} contextual tokens, but only "
                f"{leftover} tokens are left to merge",
                action.merge_rest.span,
                expected=f"at most {leftover} contextual tokens",
                code="quantity",
            )
            return None
    merge_keys = None
    if action.merge_rest is not None and action.merge_by == "keys":
        merge_keys = resolve_merge_keys(graph, action, terms, site)
        if merge_keys is None:
            return None
    recycle = None
    if action.recycle is not None and adaptive_seen and action.recycle.count.percent:
        error(graph, f"'recycle {qty_text(action.recycle.count)}' is a share of the tokens this stage drops, whose "
               "count varies per image after the adaptive count before it", action.recycle.count.span,
               expected="a number of tokens", code="adaptive")
        return None
    if action.recycle is not None:
        recycle = resolve_recycle(graph, action, terms, leftover)
        if recycle is None:
            return None
        rest = recycle[1]
    absorb = 0
    if action.absorb is not None:
        absorb = resolve_absorb(graph, action, terms, fewest, kept)
        if not absorb:
            return None
        rest = 1  # the dropped tokens' weighted sum
    cells = None
    if action.cells is not None:
        cells = resolve_cells(graph, action, terms, grid, kept)
        if cells is None:
            return None
        rest = cells[0] * cells[1]
    region = None
    proportional = action.region is not None and action.region.proportional
    if proportional and (not terms or terms[0].kind != "top"):
        first = next((t for t in action.terms if not isinstance(t, ast.ClsTokenTerm)), action.terms[0])
        error(graph, "'proportional' shares the budget by each region's mean of the first term's score, "
               f"but the first term ('{first.kind}') has no score", first.span,
               expected="a scored first term, such as 'cls top 64 per region 4x4 proportional'", code="region")
        return None
    if action.region is not None:
        if adaptive_seen:
            error(graph, "a count decided per image ('by ...') cannot also be split over regions", action.region.span,
                   expected="the stage without 'per ...', or a fixed count", code="adaptive")
            return None
        if action.region.kind == "chunk":
            region = ("chunk", action.region.chunks, 0)
            if action.region.chunks > fewest:
                error(graph, f"'per chunk {action.region.chunks}' cuts {fewest} tokens into empty chunks",
                       action.region.span, expected=f"at most {fewest} chunks", code="region")
                return None
        else:
            region = (action.region.kind, action.region.rows or 0, action.region.cols or 0)
        if action.region.kind == "region" and grid is not None:
            if action.region.rows > grid[0] or action.region.cols > grid[1]:
                error(
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
