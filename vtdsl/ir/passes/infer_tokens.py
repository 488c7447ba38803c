"""Pass: count the visual tokens at every layer and resolve every stage's quantities.

The stream is walked in order; `STAGE_KINDS` picks the function that resolves a stage
from its AST action, so a new action kind is one function and one entry there.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from ...lang import ast
from ...models.spec import ModelSpec
from ..graph import stage_node, stream, stream_nodes
from ..plan import ResolvedSite, ResolvedStage
from .common import copy_graph, error
from .keep import infer_keep
from .stage_kinds import StageInput, infer_drop, infer_merge, infer_pool

STAGE_KINDS = {ast.DropAll: infer_drop, ast.Pool: infer_pool, ast.Merge: infer_merge, ast.Keep: infer_keep}


def infer_tokens(graph: nx.DiGraph, spec: ModelSpec) -> nx.DiGraph:
    """Count the visual tokens at every ViT and LLM layer and check every quantity."""
    graph = copy_graph(graph)
    counts = _Counts.start(spec)
    obs_by_ref = {
        id(d["score"]): d["observation"]
        for _, d in graph.nodes(data=True)
        if d["kind"] == "observe" and "observation" in d
    }
    for node in stream(graph):
        data = graph.nodes[node]
        site: ResolvedSite = data["site"]
        tokens_in, tokens_min = counts.entering(site)
        s = StageInput(graph, data, tokens_in, tokens_min, counts.grid, obs_by_ref, counts.varies_from)
        resolved = STAGE_KINDS[type(s.action)](s)
        if resolved is None:
            return graph
        data["resolved"], counts.grid = resolved
        _check_deepstack(graph, spec, data)
        counts.leave(site, data["resolved"])
    projector_tokens = spec.projector_input(counts.features_out())
    llm_visual = counts.llm_visual
    if llm_visual is None:
        llm_visual = [spec.llm_entry_tokens(projector_tokens)] * spec.llm.layers
    if spec.packed_units:  # the merger runs before vit.out there: on the units the blocks hand on
        projector_tokens = spec.projector_input(counts.feature_patches)
    _annotate_stream(graph)
    graph.graph["vit_tokens"] = counts.vit_tokens
    graph.graph["projector_tokens"] = projector_tokens
    # merge-unit towers keep the processor's placeholders (and M-RoPE positions): the
    # compiled model removes the dropped units' rows at the LLM input
    graph.graph["image_placeholders"] = (spec.image_tokens if spec.packed_units
                                         else spec.llm_entry_tokens(projector_tokens))
    graph.graph["llm_visual"] = llm_visual
    return graph


def _check_deepstack(graph: nx.DiGraph, spec: ModelSpec, data: dict) -> None:
    """DeepStack (Qwen3-VL) adds one ViT feature per visual token after its first LLM
    layers: a stage in the tower or before the last of them may drop merge units or rows
    (each kept unit keeps its own features), but a merged or pooled token has no single
    feature to receive."""
    stage: ResolvedStage = data["resolved"]
    injected = spec.deepstack_llm_layers
    if not injected or stage.copies_rows:
        return
    last = injected[-1]
    if stage.site.tower == "vit" and stage.site.layer is None and stage.action == "pool":
        return  # after the merger: the DeepStack features are pooled as the merged tokens are
    if stage.site.tower == "vit":
        inner = ", ".join(str(i) for i in spec.deepstack_layers)
        error(graph, f"{spec.name}'s DeepStack mergers turn each merge unit's output of ViT blocks {inner} into "
              f"features added to its LLM token after llm.layer0 to llm.layer{last}; the {stage.action} at "
              f"{stage.site.text()} hands on merged tokens, which have none", data["stage"].action.span,
              expected="a keep or drop of whole units at a ViT site, a pool at vit.out, or a merge at "
              f"llm.layer{last + 1} or later", code="model-layout")
        return
    if stage.site.layer > injected[-1]:
        return
    error(graph, f"{spec.name} adds DeepStack features to the visual tokens after llm.layer0 to llm.layer{last}; the "
          f"{stage.action} at {stage.site.text()} hands on merged tokens, which have no single feature to receive",
          data["stage"].action.span, expected=f"the stage at llm.layer{last + 1} or later, or a keep without "
          "merging the rest", code="model-layout")


@dataclass
class _Counts:
    """The visual tokens in the stream so far, each as the most and (`_min`) the fewest
    it can be after adaptive stages (`top N by ...`); `varies_from` names the stage that
    made them vary (None: counts are exact)."""

    spec: ModelSpec
    vit_tokens: list[int]  # per ViT layer, CLS included
    patches: int  # tokens in the ViT stream now
    patches_min: int
    feature_patches: int  # what the feature layer hands over
    feature_patches_min: int
    grid: tuple[int, int] | None
    features: int | None = None  # after vit.out stages
    features_min: int | None = None
    llm_visual: list[int] | None = None  # per LLM layer, once the stream reached the LLM
    llm_min: list[int] | None = None
    varies_from: str | None = None

    @classmethod
    def start(cls, spec: ModelSpec) -> _Counts:
        patches = spec.patch_tokens
        if spec.vit_units > 1:  # ViT stages choose whole merge units: counts in units (LLM tokens)
            rows, cols = spec.llm_grid
            units = rows * cols
            return cls(spec, [spec.vit_tokens] * spec.vit.layers, units, units, units, units, spec.llm_grid)
        return cls(spec, [spec.vit_tokens] * spec.vit.layers, patches, patches, patches, patches, spec.grid)

    def entering(self, site: ResolvedSite) -> tuple[int, int]:
        """The most and the fewest tokens entering a stage at `site`."""
        if site.tower == "vit" and site.layer is not None:
            return self.patches, self.patches_min
        if self.features is None:
            self.features, self.features_min = self.feature_patches, self.feature_patches_min
        if site.tower == "vit":
            return self.features, self.features_min
        if self.llm_visual is None:
            self._enter_llm()
        return self.llm_visual[site.layer], self.llm_min[site.layer]

    def _enter_llm(self) -> None:
        spec = self.spec
        self.llm_visual = [spec.llm_entry_tokens(spec.projector_input(self.features))] * spec.llm.layers
        self.llm_min = [spec.llm_entry_tokens(spec.projector_input(self.features_min))] * spec.llm.layers
        # the LLM's token grid: one crop's, merged (Qwen2.5-VL) or a video frame's, pooled;
        # none for packed crops (anyres)
        if spec.packs_crops:
            self.grid = None
        elif self.grid is not None and (spec.spatial_merge > 1 or spec.pools_frames):
            self.grid = spec.llm_grid

    def leave(self, site: ResolvedSite, stage: ResolvedStage) -> None:
        """Record what the stage at `site` hands on, from its layer to the tower's last."""
        spec = self.spec
        out, out_min = stage.tokens_out, stage.fewest_out
        if out_min != out and self.varies_from is None:
            self.varies_from = site.text()
        if site.tower == "vit" and site.layer is not None:
            cls = 1 if spec.has_cls else 0
            self.patches, self.patches_min = out, out_min
            self.vit_tokens[site.layer :] = [out * spec.vit_units + cls] * (spec.vit.layers - site.layer)
            if site.layer <= spec.feature_layer_index + 1:  # the token set that becomes the features
                self.feature_patches, self.feature_patches_min = out, out_min
        elif site.tower == "vit":
            self.features, self.features_min = out, out_min
        else:
            self.llm_visual[site.layer :] = [out] * (spec.llm.layers - site.layer)
            self.llm_min[site.layer :] = [out_min] * (spec.llm.layers - site.layer)

    def features_out(self) -> int:
        """The patch tokens the feature layer and any vit.out stages hand the projector."""
        return self.feature_patches if self.features is None else self.features


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
            tokens = stage.tokens_out - (stage.rest.tokens if stage.rest is not None else 0)
        elif data["kind"] in ("merge", "drop"):
            tokens = stage.tokens_out
    # the sink edge carries what the last stage handed on (None: no stages)
