"""Pass: static checks that need resolved sites but no token counts."""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from ...lang import ast
from ...lang.scorers import SCORERS
from ...models.spec import ModelSpec
from ..graph import observations_of, stream
from ..plan import Observation, ResolvedSite
from .common import TOWER_NAMES, copy_graph, error, ref_text, warn


def validate(graph: nx.DiGraph, spec: ModelSpec) -> nx.DiGraph:
    """Static checks that need resolved sites but no token counts."""
    graph = copy_graph(graph)
    seen = _Seen()
    for node in stream(graph):
        data = graph.nodes[node]
        stage: ast.Stage = data["stage"]
        site: ResolvedSite = data["site"]
        _validate_sequence(graph, stage, data["order"], seen)
        _warn_after_features(graph, spec, stage, site)
        _validate_cls_stage(graph, spec, stage, site, seen)
        _validate_renumber(graph, spec, stage, site)
        if isinstance(stage.action, ast.DropAll):
            seen.dropped_at = stage.site.text()
        seen.previous_key, seen.previous_site = data["order"], stage.site.text()
        _validate_layout(graph, spec, stage, site)
        for obs_node in observations_of(graph, data["index"]):
            obs_data = graph.nodes[obs_node]
            if "observation" not in obs_data:
                continue
            _validate_observation(graph, spec, obs_data, data)
    return graph


@dataclass
class _Seen:
    """What the stages before this one did, as far as the checks need it."""

    previous_key: tuple | None = None  # the previous stage's execution-order key
    previous_site: str | None = None
    dropped_at: str | None = None  # the site of a 'drop all'
    cls_kept_at: str | None = None  # the first stage that kept the CLS token


def _validate_sequence(graph, stage: ast.Stage, order: tuple, seen: _Seen) -> None:
    """No stage after 'drop all'; stages in execution order."""
    if seen.dropped_at is not None:
        error(
            graph,
            f"no visual tokens are left at {stage.site.text()}: 'drop all' at {seen.dropped_at} "
            "ended the visual stream",
            stage.span,
            expected="no stage after 'drop all'",
            code="after-drop",
        )
    if seen.previous_key is not None and order < seen.previous_key:
        error(
            graph,
            f"stage at {stage.site.text()} runs before the previous stage at {seen.previous_site}; "
            "write stages in execution order (vit layers, vit.out, then llm layers)",
            stage.site.span,
            expected=f"a site at or after {seen.previous_site}",
            code="stage-order",
        )


def _warn_after_features(graph, spec: ModelSpec, stage: ast.Stage, site: ResolvedSite) -> None:
    feature_entry = spec.feature_layer_index + 1  # the token set that becomes the features
    if site.tower == "vit" and site.layer is not None and site.layer > feature_entry:
        warn(
            graph,
            f"{stage.site.text()} comes after the feature layer (vit.layer{spec.feature_layer_index}, "
            f"vision_feature_layer={spec.vision_feature_layer}): it only saves compute in "
            "layers whose output is unused and does not change the image features",
            stage.site.span,
            code="after-features",
        )


def _validate_cls_stage(graph, spec: ModelSpec, stage: ast.Stage, site: ResolvedSite, seen: _Seen) -> None:
    """A kept CLS token must stay the first token: nothing at vit.out may treat it as a patch."""
    if isinstance(stage.action, ast.Keep):
        _validate_cls_token(graph, spec, stage, site, seen.cls_kept_at)
        if any(isinstance(t, ast.ClsTokenTerm) for t in stage.action.terms):
            seen.cls_kept_at = seen.cls_kept_at or stage.site.text()
    elif seen.cls_kept_at is not None and site.tower == "vit":
        error(graph, f"'{stage.action.kind}' at vit.out after 'cls_token' was kept at {seen.cls_kept_at} would "
              "treat the CLS token as a patch", stage.span, expected="'cls_token' in the last vit.out stage",
              code="cls-token")


def _validate_renumber(graph, spec: ModelSpec, stage: ast.Stage, site: ResolvedSite) -> None:
    if stage.renumber and site.tower == "vit":
        error(graph, f"'renumber' re-numbers the LLM's rotary positions; {stage.site.text()} is in the vision "
              "tower, whose position embeddings were added before its first layer",
              stage.renumber_span or stage.span, expected="'renumber' on an llm.layerN stage",
              code="renumber")
    elif stage.renumber and spec.position_streams > 1:
        error(graph, f"{spec.name} gives visual tokens 3-D M-RoPE positions (time, row, column), which have no "
              "contiguous re-numbering; kept tokens keep their positions", stage.renumber_span or stage.span,
              expected="the stage without 'renumber'", code="renumber")


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
        error(graph, f"{spec.name} merges {m}x{m} groups of ViT patches into one token after the vision tower; "
               f"a stage at {site.text()} would have to keep whole {m}x{m} groups, which vtdsl does not do",
               stage.site.span, expected="an llm.layerN site (llm.layer0 prunes the merged tokens before the LLM)",
               code="model-layout")
        return
    if site.tower != "llm" or not spec.packs_crops:
        return
    action = stage.action
    why = (f"on {spec.name} the LLM's visual tokens are a base view, unpadded crops and newline tokens, "
           "not one token grid")
    expected = "a non-spatial selector (top, diverse, uniform, random, unique) or 'per crop'"
    if isinstance(action, ast.Pool):
        error(graph, f"'pool' at {site.text()}: {why}", action.span, expected="pool at vit.out (per crop)",
               code="model-layout")
    elif isinstance(action, ast.Keep):
        for term in action.terms:
            if isinstance(term, ast.BuffersTerm):
                error(graph, f"'buffers' at {site.text()}: {why}", term.span, expected=expected, code="model-layout")
        if action.region is not None and action.region.kind == "region":
            error(graph, f"'per region' at {site.text()}: {why}", action.region.span, expected=expected,
                   code="model-layout")


def _validate_cls_token(graph, spec: ModelSpec, stage: ast.Stage, site: ResolvedSite, kept_at: str | None) -> None:
    """`cls_token` exists for one case: a vit.out where the select strategy dropped CLS."""
    terms = [t for t in stage.action.terms if isinstance(t, ast.ClsTokenTerm)]
    if not terms:
        if kept_at is not None and site.tower == "vit":
            error(graph, f"a vit.out stage after 'cls_token' was kept at {kept_at} would treat the CLS token "
                   "as a patch", stage.span, expected="'cls_token' in the last vit.out stage", code="cls-token")
        return
    expected = "'cls_token' only at vit.out, once"
    if len(terms) > 1:
        error(graph, "'cls_token' appears twice in one stage", terms[1].span, expected=expected, code="cls-token")
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
    error(graph, message, term.span, expected=expected, code="cls-token")


def _validate_observation(graph, spec: ModelSpec, obs_data: dict, stage_data: dict) -> None:
    ref: ast.ScoreRef = obs_data["score"]
    obs: Observation = obs_data["observation"]
    meaning = SCORERS[ref.name]
    stage_site: ResolvedSite = stage_data["site"]
    where = f"{obs.tower}.layer{obs.layer}"
    if obs.tower not in meaning.towers:
        message = meaning.tower_error.format(name=ref.name, where=where)
        error(graph, message, ref.span, expected="a score valid at " + where, code="scorer-site")
        return
    problem = meaning.check(obs, spec) if meaning.check is not None else None
    if problem:
        error(graph, problem, ref.span, expected="a score valid at " + where, code="scorer-site")
        return
    if obs.image_keys and obs.tower == "vit":
        error(graph, f"'image_keys' restricts an LLM attention to the image tokens' keys; at {where} every key is "
               "a patch", ref.span, expected=f"'{ref.name}' without image_keys", code="scorer-args")
        return
    if not obs.rope and obs.tower == "vit":
        error(graph, f"the ViT has no rotary position embeddings: 'no_rope' changes nothing at {where}", ref.span,
               expected=f"'{ref.name}' without no_rope", code="scorer-args")
        return
    if obs.on_input and not meaning.on_input:
        error(graph, f"'{ref.name}' reads the keys a layer computed; at the stage entering {where} they do not "
               "exist yet", ref.span, expected=f"{ref.name}@{obs.tower}.layer{obs.layer - 1} (the layer before)",
               code="observe-order")
        return
    if isinstance(obs.heads, int):
        tower = spec.vit if obs.tower == "vit" else spec.llm
        if obs.heads > tower.heads:
            error(graph, f"'top {obs.heads} heads' asks for more heads than {spec.name}'s {TOWER_NAMES[obs.tower]} has "
                   f"({tower.heads})", ref.span, expected=f"at most {tower.heads} heads", code="scorer-args")
            return
    if obs.queries == "visual" and obs.tower == "vit":
        error(graph, f"in the ViT every query is a visual token: 'attn(visual)' is 'attn' at {where}", ref.span,
               expected="attn", code="scorer-args")
        return
    if meaning.needs_cls and not spec.has_cls:
        error(
            graph,
            f"{spec.name}'s vision tower has no CLS token, so '{ref.name}' has nothing to read",
            ref.span,
            expected="an LLM score such as text or attn" if spec.spatial_merge > 1 else "a score such as attn or norm",
            code="no-cls",
        )
        return
    if obs.tower == "vit" and spec.spatial_merge > 1:
        error(graph, f"{spec.name}'s vision tower orders patches by attention window and merges them "
               f"{spec.spatial_merge}x{spec.spatial_merge} before the LLM; vtdsl reads no ViT scores there",
               ref.span, expected="an LLM score such as text@llm.layer2", code="model-layout")
        return
    if obs.tower == "vit" and stage_site.tower == "llm" and spec.packs_crops:
        error(graph, f"'{ref_text(ref)}' scores ViT crop patches, but the stage at {stage_site.text()} chooses "
               f"among {spec.name}'s packed LLM tokens (base view, unpadded crops, newline tokens)",
               ref.span, expected="an LLM score such as text@llm.layer2, or the stage at vit.out", code="model-layout")
        return
    if obs_data["order"] >= stage_data["order"]:
        error(
            graph,
            f"'{ref_text(ref)}' is read at {where}, which runs after the stage at "
            f"{stage_site.text()} has already chosen its tokens",
            ref.span,
            expected=f"an observation before {stage_site.text()}",
            code="observe-order",
        )
