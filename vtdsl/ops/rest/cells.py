"""`then recycle rest into RxC cells` (VFlowOpt).

The token grid is cut into R x C cells (as `per region RxC`); the tokens the terms dropped
in each cell, weighted by the first term's score, become one token per cell, kept after
the selected ones. No counted FLOPs (weighted sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from ...lang.ast import Rest
from ...lang.yaml_keys import YamlKey
from .base import RestContext, RestOption, RestPlan, register


class Cells(Rest):
    """`then recycle rest into RxC cells`."""

    kind: Literal["cells"] = "cells"
    rows: int = Field(ge=1, le=64)
    cols: int = Field(ge=1, le=64)


@dataclass(frozen=True)
class Celled(RestPlan):
    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols

    def listing(self) -> str:
        return f" then recycle rest into {self.rows}x{self.cols} cells"

    def run(self, x, kept, scores, view):
        import torch

        from ..merge import recycle_cells
        from ..select import split_regions

        tokens = view.tokens
        cell_ids = split_regions(tokens.gpos, tokens.grid, self.rows, self.cols)
        if cell_ids.dim() == 1:
            cell_ids = cell_ids[None].expand(x.shape[0], -1)
        out, best = recycle_cells(x, kept, scores, cell_ids, self.rows * self.cols)
        return out, torch.cat([kept, best], dim=1)  # a cell's token: its best dropped token's identity


def _band_sizes(length: int, parts: int) -> list[int]:
    """How many of `length` grid rows (columns) fall in each of `parts` bands, by the
    `per region` rule: row r is in band floor(r * parts / length)."""
    sizes = [0] * parts
    for r in range(length):
        sizes[r * parts // length] += 1
    return sizes


class CellsOption(RestOption):
    kind = "cells"
    rank = 40
    model = Cells
    rule = "cells"
    grammar = """
cells: _THEN _RECYCLE _REST _INTO GRID _CELLS
"""
    keywords = {"_RECYCLE": ("recycle", "'recycle'"), "_CELLS": ("cells", "'cells'")}
    phrase = "'recycle rest into'"
    yaml_keys = (YamlKey("recycle_cells", " then recycle rest into ", "grid", after=" cells"),)

    def build(self, b, tree):
        rows, cols = b.grid(tree.children[0], "cell")
        return b.node(Cells, b.span(tree), rows=rows, cols=cols)

    def text(self, node: Cells) -> str:
        return f" then recycle rest into {node.rows}x{node.cols} cells"

    def read_yaml(self, reader, m) -> Cells:
        rows, cols = reader.key_value(m, "recycle_cells")
        return reader.node(Cells, reader.join(*m["recycle_cells"]), rows=rows, cols=cols)

    def write_yaml(self, node: Cells, item: dict) -> None:
        item["recycle_cells"] = f"{node.rows}x{node.cols}"

    def legacy(self, data: dict) -> dict | None:
        old = data.pop("cells", None)
        return None if old is None else {**old, "kind": "cells"}

    def resolve(self, node: Cells, ctx: RestContext) -> Celled | None:
        """The full token grid cut as `per region RxC`; every cell must keep a dropped
        token whatever the terms keep, so it has more tokens than they keep in all."""
        if not ctx.first_term_scored("'recycle rest into cells' weights the dropped tokens by",
                                     "cls top 64 then recycle rest into 2x2 cells", "recycle"):
            return None
        grid, kept = ctx.grid, ctx.kept
        if grid is None:
            ctx.error(f"'recycle rest into {node.rows}x{node.cols} cells' needs the full token grid, but an earlier "
                      "stage already pruned or merged it (or the model's visual tokens form no grid here)", node.span,
                      expected="cells in the first stage that cuts the grid", code="pool-grid")
            return None
        if node.rows > grid[0] or node.cols > grid[1]:
            ctx.error(f"'{node.rows}x{node.cols} cells' split a {grid[0]}x{grid[1]} token grid into empty cells",
                      node.span, expected=f"at most {grid[0]}x{grid[1]} cells", code="region")
            return None
        smallest = min(_band_sizes(grid[0], node.rows)) * min(_band_sizes(grid[1], node.cols))
        if smallest <= kept:
            ctx.error(f"a {node.rows}x{node.cols} cell can hold as few as {smallest} tokens, which the terms (keeping "
                      f"{kept}) could all keep, leaving the cell nothing to recycle", node.span,
                      expected=f"cells of more than {kept} tokens (fewer, larger cells)", code="recycle")
            return None
        return Celled(node.rows, node.cols)


OPTION = register(CellsOption())
