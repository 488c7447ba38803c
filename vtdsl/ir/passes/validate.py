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

    - A merger of fixed patch groups (Qwen-VL's merge units in the tower's own order;
      InternVL3's and SmolVLM's pixel shuffle, Gemma 3's pool after it, `spec.vit_units`):
      ViT stages choose whole groups (merge units), allowed; a patch merger whose groups a
      ViT stage cannot keep whole: ViT stages refused.
    - Anyres (LLaVA-NeXT): the LLM's visual tokens are the base view, the unpadded grid
      crops and newline tokens, not one grid; spatial selectors there are refused.
    - Image splitting sized for an image (SmolVLM): the LLM's visual tokens are its tiles'
      grids one after the other between text tokens, not one grid; refused alike.
    - A video of pooled frames (LLaVA-OneVision, LLaVA-NeXT-Video): ViT stages refused (the
      pool needs each frame's whole grid); spatial LLM selectors refused as for tiles.
    """
    if site.tower == "vit" and spec.vit_units > 1 and spec.video_frames:
        error(graph, f"ViT stages on {spec.name} choose merge units of one image; on a video of "
              f"{spec.vit_crops} temporal groups vtdsl does not run them", stage.site.span,
              expected="an llm.layerN site for a video", code="model-layout")
        return
    if site.tower == "vit" and spec.pools_frames:
        error(graph, f"{spec.name} pools each video frame's whole {spec.grid[0]}x{spec.grid[1]} feature grid "
              f"{spec.frame_pool}x{spec.frame_pool} after the vision tower, so a stage at {site.text()} would "
              "leave it no grid to pool", stage.site.span, expected="an llm.layerN site for a video",
              code="model-layout")
        return
    if site.tower == "vit" and spec.spatial_merge > 1 and spec.vit_units == 1:
        m = spec.spatial_merge
        error(graph, f"{spec.name} merges {m}x{m} groups of ViT patches into one token after the vision tower; "
              f"a stage at {site.text()} would have to keep whole {m}x{m} groups, which vtdsl does not do",
              stage.site.span, expected="an llm.layerN site (llm.layer0 prunes the merged tokens before the LLM)",
              code="model-layout")
        return
    if site.tower != "llm" or not (spec.packs_crops or spec.vit_crops > 1):
        return
    action = stage.action
    why = (f"on {spec.name} the LLM's visual tokens are a base view, unpadded crops and newline tokens, "
           "not one token grid") if spec.packs_crops else (
        f"on {spec.name} sized for a video the LLM's visual tokens are its {spec.vit_crops} temporal groups' "
        "grids one after the other, not one token grid") if spec.video_frames else (
        f"on {spec.name} sized for one image the LLM's visual tokens are its {spec.vit_crops} tiles' grids one "
        "after the other, not one token grid")
    expected = "a non-spatial selector (top, diverse, uniform, random, unique) or 'per crop'"
    if isinstance(action, ast.Pool):
        where = "pool at vit.out (per crop)" if spec.packs_crops else "pool on an image (without --video)" \
            if spec.video_frames else "pool on the per-tile spec (without --image)"
        error(graph, f"'pool' at {site.text()}: {why}", action.span, expected=where, code="model-layout")
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
    elif spec.merged_features:
        m = spec.spatial_merge
        message = (f"on '{spec.name}' the projector reads merged tokens of {m * m} patches each; the CLS "
                   "token is one patch wide and never reaches it, so 'cls_token' cannot keep it")
    elif site.tower == "llm":
        message = (f"'cls_token' keeps the CLS token at vit.out; at {site.text()} the LLM only sees what the "
                   "projector received")
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
    """Report the first of `OBSERVATION_CHECKS` that refuses this observation."""
    read = _Read(obs_data["score"], obs_data["observation"], SCORERS[obs_data["score"].name], spec,
                 stage_data["site"], obs_data["order"], stage_data["order"])
    for check in OBSERVATION_CHECKS:
        found = check(read)
        if found is not None:
            message, expected, code = found
            error(graph, message, read.ref.span, expected=expected, code=code)
            return


@dataclass(frozen=True)
class _Read:
    """One observation and the stage that reads it."""

    ref: ast.ScoreRef
    obs: Observation
    meaning: object  # the scorer's SCORERS entry
    spec: ModelSpec
    stage_site: ResolvedSite
    order: tuple  # when the observation is read
    stage_order: tuple  # when the stage chooses its tokens

    @property
    def where(self) -> str:
        return f"{self.obs.tower}.layer{self.obs.layer}"


# Each check returns (message, expected, code) when it refuses the observation, else None.


def _scorer_tower(r: _Read):
    if r.obs.tower not in r.meaning.towers:
        message = r.meaning.tower_error.format(name=r.ref.name, where=r.where)
        return message, "a score valid at " + r.where, "scorer-site"
    return None


def _scorer_own_check(r: _Read):
    problem = r.meaning.check(r.obs, r.spec) if r.meaning.check is not None else None
    return (problem, "a score valid at " + r.where, "scorer-site") if problem else None


def _image_keys_in_vit(r: _Read):
    if r.obs.image_keys and r.obs.tower == "vit":
        return (f"'image_keys' restricts an LLM attention to the image tokens' keys; at {r.where} every key is a patch",
                f"'{r.ref.name}' without image_keys", "scorer-args")
    return None


def _no_rope_in_vit(r: _Read):
    if not r.obs.rope and r.obs.tower == "vit" and r.spec.packed_units:
        return (f"{r.spec.name}'s ViT scores read q and k as its blocks rotate them (2-D RoPE); vtdsl does not "
                f"read them unrotated at {r.where}", f"'{r.ref.name}' without no_rope", "scorer-args")
    if not r.obs.rope and r.obs.tower == "vit":
        return (f"the ViT has no rotary position embeddings: 'no_rope' changes nothing at {r.where}",
                f"'{r.ref.name}' without no_rope", "scorer-args")
    return None


def _on_input(r: _Read):
    obs, name = r.obs, r.ref.name
    if obs.on_input and not r.meaning.on_input:
        return (f"'{name}' reads the keys a layer computed; at the stage entering {r.where} they do not exist yet",
                f"{name}@{obs.tower}.layer{obs.layer - 1} (the layer before)", "observe-order")
    return None


def _too_many_heads(r: _Read):
    obs, spec = r.obs, r.spec
    if not isinstance(obs.heads, int):
        return None
    tower = spec.vit if obs.tower == "vit" else spec.llm
    if obs.heads > tower.heads:
        return (f"'top {obs.heads} heads' asks for more heads than {spec.name}'s {TOWER_NAMES[obs.tower]} has "
                f"({tower.heads})", f"at most {tower.heads} heads", "scorer-args")
    return None


def _visual_queries_in_vit(r: _Read):
    if r.obs.queries == "visual" and r.obs.tower == "vit":
        return (f"in the ViT every query is a visual token: 'attn(visual)' is 'attn' at {r.where}", "attn",
                "scorer-args")
    return None


def _needs_cls(r: _Read):
    spec = r.spec
    if r.meaning.needs_cls and not spec.has_cls:
        return (f"{spec.name}'s vision tower has no CLS token, so '{r.ref.name}' has nothing to read",
                "an LLM score such as text or attn" if spec.spatial_merge > 1 and spec.vit_units == 1
                else "a score such as attn or norm",
                "no-cls")
    return None


def _vit_of_merged_patches(r: _Read):
    spec = r.spec
    if r.obs.tower == "vit" and spec.merged_features and r.stage_site.tower == "llm":
        return (f"on {spec.name} ViT scores are summed over each shuffled or pooled {spec.spatial_merge}x"
                f"{spec.spatial_merge} group for a vit.out stage; '{ref_text(r.ref)}' read by the stage at "
                f"{r.stage_site.text()} is not", "the stage at vit.out, or an LLM score such as text@llm.layer2",
                "model-layout")
    if r.obs.tower == "vit" and spec.spatial_merge > 1 and not spec.merged_features and spec.vit_units == 1:
        order = "orders patches by attention window and merges them" if spec.vit_window else "merges patches"
        return (f"{spec.name}'s vision tower {order} "
                f"{spec.spatial_merge}x{spec.spatial_merge} before the LLM; vtdsl reads no ViT scores there",
                "an LLM score such as text@llm.layer2", "model-layout")
    return None


def _vit_for_packed_crops(r: _Read):
    if r.obs.tower == "vit" and r.stage_site.tower == "llm" and r.spec.packs_crops:
        return (f"'{ref_text(r.ref)}' scores ViT crop patches, but the stage at {r.stage_site.text()} chooses "
                f"among {r.spec.name}'s packed LLM tokens (base view, unpadded crops, newline tokens)",
                "an LLM score such as text@llm.layer2, or the stage at vit.out", "model-layout")
    if r.obs.tower == "vit" and r.spec.pools_frames:
        pool = r.spec.frame_pool
        return (f"'{ref_text(r.ref)}' scores a video frame's ViT patches, but {r.spec.name} pools them {pool}x{pool} "
                "before the LLM; vtdsl reads no ViT scores on a video there", "an LLM score such as text@llm.layer2",
                "model-layout")
    return None


def _read_after_stage(r: _Read):
    if r.order >= r.stage_order:
        return (f"'{ref_text(r.ref)}' is read at {r.where}, which runs after the stage at "
                f"{r.stage_site.text()} has already chosen its tokens",
                f"an observation before {r.stage_site.text()}", "observe-order")
    return None


# in order: the first that refuses is reported; a new rule on what a score may read is one
# function and one entry here
OBSERVATION_CHECKS = (_scorer_tower, _scorer_own_check, _image_keys_in_vit, _no_rope_in_vit, _on_input,
                      _too_many_heads, _visual_queries_in_vit, _needs_cls, _vit_of_merged_patches,
                      _vit_for_packed_crops, _read_after_stage)
