"""`then absorb K` (PruMerge).

Each kept token adds its K most similar other tokens (a percentage: of the tokens entering
but itself), weighted by the first term's score; the dropped tokens, so weighted, become
one more token. Cost: the kept tokens against all n, ``2·kept·n·d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...lang.ast import Quantity, Rest
from ...lang.format import format_quantity
from ...lang.yaml_keys import YamlKey, quantity_data
from .base import RestContext, RestOption, RestPlan, register


class Absorb(Rest):
    """`then absorb K`."""

    kind: Literal["absorb"] = "absorb"
    neighbours: Quantity


@dataclass(frozen=True)
class Absorbed(RestPlan):
    neighbours: int  # K

    @property
    def tokens(self) -> int:
        return 1  # the dropped tokens' weighted sum

    def flops(self, stage, d: int, head_dim: int) -> int:
        k = stage.tokens_out - stage.keep_cls - 1  # kept tokens, each against all n
        return 2 * k * stage.tokens_in * d  # one cosine-similarity matrix [k, d] x [d, n]

    def listing(self) -> str:
        return f" then absorb {self.neighbours}"

    def run(self, x, kept, scores, view):
        import torch

        from ..merge import absorb_neighbours

        out, extra = absorb_neighbours(x, kept, scores, self.neighbours)
        return out, torch.cat([kept, extra], dim=1)  # the extra token: its best dropped token's identity


class AbsorbOption(RestOption):
    kind = "absorb"
    rank = 30
    model = Absorb
    rule = "absorb"
    grammar = """
absorb: _THEN _ABSORB quantity
"""
    keywords = {"_ABSORB": ("absorb", "'absorb'")}
    then_words = "'then absorb K'"
    phrase = "'absorb'"
    yaml_keys = (YamlKey("absorb", " then absorb ", "quantity"),)

    def build(self, b, tree):
        return b.node(Absorb, b.span(tree), neighbours=b.quantity(tree.children[0]))

    def text(self, node: Absorb) -> str:
        return " then absorb " + format_quantity(node.neighbours)

    def read_yaml(self, reader, m) -> Absorb:
        neighbours = reader.key_value(m, "absorb")
        return reader.node(Absorb, reader.join(*m["absorb"]), neighbours=neighbours)

    def write_yaml(self, node: Absorb, item: dict) -> None:
        item["absorb"] = quantity_data(node.neighbours)

    def legacy(self, data: dict) -> dict | None:
        old = data.pop("absorb", None)
        return None if old is None else {"kind": "absorb", "neighbours": old}

    def shares(self, node: Absorb) -> list:
        return [node.neighbours]

    def resolve(self, node: Absorb, ctx: RestContext) -> Absorbed | None:
        """K of the fewest tokens entering but one (a percent: of them); the first term's
        score weights what is absorbed, and something must be dropped."""
        if not ctx.first_term_scored("'absorb' weights what each kept token takes in by",
                                     "cls top 32 then absorb 32", "absorb"):
            return None
        n = ctx.fewest
        if ctx.kept >= n:
            ctx.error(f"'absorb' needs dropped tokens, but the terms keep all {n}", node.neighbours.span,
                      expected=f"terms keeping fewer than {n} tokens", code="absorb")
            return None
        k = ctx.quantity(node.neighbours, n - 1)
        if not 1 <= k <= n - 1:
            ctx.error(f"'absorb {ctx.qty_text(node.neighbours)}' asks each kept token for {k} neighbours among the "
                      f"{n - 1} others", node.neighbours.span, expected=f"between 1 and {n - 1}", code="quantity")
            return None
        return Absorbed(k)


OPTION = register(AbsorbOption())
