"""What enters one stage, and the stage kinds that need no more than a count: `drop all`,
`pool RxC` and ToMe's `merge r` (a `keep` has its own module).

Each kind is a function `StageInput -> (ResolvedStage, grid after it) | None`; None means
an error was reported. `infer_tokens.STAGE_KINDS` picks the function by AST action.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from ...lang import ast
from ..plan import ResolvedSite, ResolvedStage
from .common import error, qty_text, resolve_quantity


@dataclass(frozen=True)
class StageInput:
    """One stage and the tokens entering it: `tokens_in` the most (what the cost model
    charges after adaptive stages), `fewest` the fewest, which every quantity must fit."""

    graph: nx.DiGraph
    data: dict  # the stage node's attributes
    tokens_in: int
    fewest: int
    grid: tuple[int, int] | None  # the token grid entering, None once pruned or merged
    obs_by_ref: dict  # id(ast.ScoreRef) -> Observation
    varies_from: str | None  # the site of the adaptive stage that made counts vary

    @property
    def stage(self) -> ast.Stage:
        return self.data["stage"]

    @property
    def action(self):
        return self.stage.action

    @property
    def site(self) -> ResolvedSite:
        return self.data["site"]

    @property
    def varies(self) -> bool:
        return self.fewest != self.tokens_in

    def common(self) -> dict:
        """The ResolvedStage fields every kind fills the same way."""
        stage = self.stage
        return dict(index=self.data["index"], site=self.site, tokens_in=self.tokens_in, span=stage.span,
                    renumber=stage.renumber, tokens_in_min=self.fewest if self.varies else None)

    def entering(self) -> str:
        if not self.varies:
            return f"{self.tokens_in} enter this stage at {self.site.text()}"
        return f"as few as {self.fewest} enter this stage at {self.site.text()}"


def percent_of_varying(s: StageInput, quantities: list) -> bool:
    """Refuse a percentage of a token count that varies per image (after an adaptive
    stage): it would resolve to a different count per image. True if one was found."""
    if not s.varies:
        return False
    for qty in quantities:
        if qty.percent:
            error(s.graph, f"'{qty_text(qty)}' is a share of the tokens entering this stage, whose count varies per "
                  f"image after the adaptive count at {s.varies_from or 'an earlier stage'}", qty.span,
                  expected="a number of tokens", code="adaptive")
            return True
    return False


def resolve_frames(s: StageInput, region: ast.Region) -> tuple[str, int, int] | None:
    """`per frame`, `per window N`, `per segment C`: the plan's region over a video's
    frames (the LLM's tokens of each temporal group), or None when reported."""
    spec = s.graph.graph["spec"]
    refusal = spec.frames_refusal()
    if refusal is None and s.site.tower != "llm":
        refusal = f"the vision tower encodes one temporal group at a time, so {s.site.text()} sees no frames"
    if refusal is not None:
        error(s.graph, f"'per {region.kind}' names the frames of a video, but {refusal}", region.span,
              expected="a video input (vtdsl check --video FRAMESxHxW) at an llm.layerN site, or 'per crop' / "
                       "'per chunk N' on an image", code="frames")
        return None
    frames = spec.vit_crops if spec.video_frames else 1
    if region.kind == "segment" and spec.video_frames and region.segments > frames:
        error(s.graph, f"'per segment {region.segments}' cuts a video of {frames} frames (temporal groups) into "
              "empty segments", region.span, expected=f"at most {frames} segments", code="region")
        return None
    size = {"frame": frames, "window": region.window, "segment": region.segments}[region.kind]
    return region.kind, size, 0


def infer_drop(s: StageInput):
    return ResolvedStage(action="drop", tokens_out=0, **s.common()), None


def infer_pool(s: StageInput):
    action: ast.Pool = s.action
    if s.grid is None:
        error(
            s.graph,
            f"'pool {action.rows}x{action.cols}' needs the full token grid, but an earlier stage "
            "already pruned or merged it",
            action.span,
            expected="pool before any keep or merge stage",
            code="pool-grid",
        )
        return None
    rows, cols = math.ceil(s.grid[0] / action.rows), math.ceil(s.grid[1] / action.cols)
    stage_out = ResolvedStage(action="pool", tokens_out=rows * cols, pool=(action.rows, action.cols), **s.common())
    return stage_out, (rows, cols)


def infer_static(s: StageInput):
    """`merge static Q per window N | per segment C`: DyCoke's TTM. Every window (segment)
    keeps its first frame whole and Q fewer tokens of each other frame, so the count out
    is F·N − (F − S)·Q for S windows (segments)."""
    action: ast.Merge = s.action
    region = action.region
    resolved = resolve_frames(s, region)
    if resolved is None:
        return None
    if region.below is not None:
        error(s.graph, "'merge static' keeps a whole first frame per segment, so a segment count that varies "
              "per clip ('below') would vary the tokens kept", region.span,
              expected=f"'per segment {region.segments}' without 'below', or 'per window N'", code="frames")
        return None
    spec = s.graph.graph["spec"]
    frames = spec.vit_crops if spec.video_frames else 1
    if spec.video_frames and spec.video_newline:
        error(s.graph, f"'merge static' compares each token with the same position in another frame, but "
              f"{spec.name}'s video ends with a newline token that has no place in a frame", action.span,
              expected="a keep stage ('per frame' splits its count over the frames)", code="frames")
        return None
    if s.grid is None or s.varies or s.tokens_in % frames:
        error(s.graph, "'merge static' compares each token with the same position in another frame, so it needs "
              "every token of every frame, but an earlier stage removed some", action.span,
              expected="'merge static' before any other stage", code="frames")
        return None
    per_frame = s.tokens_in // frames
    merged = resolve_quantity(action.pairs, per_frame)
    if merged > per_frame:
        error(s.graph, f"'merge static {qty_text(action.pairs)}' merges {merged} tokens of each frame, but a frame "
              f"has {per_frame}", action.pairs.span, expected=f"at most {per_frame} tokens", code="quantity")
        return None
    kind, size, _ = resolved
    groups = -(-frames // size) if kind == "window" else min(size, frames)
    out = s.tokens_in - (frames - groups) * merged
    stage_out = ResolvedStage(action="static", tokens_out=out, region=resolved, merge_rest=merged, **s.common())
    return stage_out, (s.grid if out == s.tokens_in else None)


def infer_merge(s: StageInput):
    action: ast.Merge = s.action
    if action.static:
        return infer_static(s)
    if percent_of_varying(s, [action.pairs]):
        return None
    fewest, varies = s.fewest, s.varies
    pairs = resolve_quantity(action.pairs, s.tokens_in)
    if pairs > fewest // 2:
        error(
            s.graph,
            f"'merge {qty_text(action.pairs)}' asks for {pairs} merged pairs, but "
            f"{'as few as ' if varies else ''}{fewest} tokens enter this stage: "
            f"at most {fewest // 2} pairs can be merged",
            action.pairs.span,
            expected=f"at most {fewest // 2} pairs",
            code="quantity",
        )
        return None
    stage_out = ResolvedStage(action="merge", tokens_out=s.tokens_in - pairs, merge_rest=pairs,
                              tokens_out_min=fewest - pairs if varies else None, **s.common())
    return stage_out, (s.grid if pairs == 0 else None)
