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


def infer_merge(s: StageInput):
    action: ast.Merge = s.action
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
