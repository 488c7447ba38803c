"""`then recycle N into M` (SparseVLM v1).

Of the tokens the terms did not keep, the N the first term scores highest (a percentage:
of those dropped tokens) are clustered by DPC-kNN into M tokens (a percentage: of the N),
kept after the selected ones; the other dropped tokens are discarded. In the LLM the
cluster tokens follow the image's kept tokens, as v1 appends them: they take the image's
last slots (with `renumber`, v1's positions); a cluster is still named by its centre.
Cost: the recycled tokens' pairwise distances, ``2·N²·d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...lang.ast import Quantity, Rest
from ...lang.format import format_quantity
from ...lang.yaml_keys import YamlKey, quantity_data
from .base import RestContext, RestOption, RestPlan, register


class Recycle(Rest):
    """`then recycle N into M`."""

    kind: Literal["recycle"] = "recycle"
    count: Quantity
    clusters: Quantity


@dataclass(frozen=True)
class Recycled(RestPlan):
    count: int  # m: dropped tokens recycled
    clusters: int  # c: tokens they become

    @property
    def tokens(self) -> int:
        return self.clusters

    @property
    def appends(self) -> bool:
        return True  # v1 appends the cluster tokens after the kept visual tokens

    def flops(self, stage, d: int, head_dim: int) -> int:
        return 2 * self.count * self.count * d  # DPC-kNN: one m x m distance matrix

    def listing(self) -> str:
        return f" then recycle {self.count} into {self.clusters}"

    def run(self, x, kept, scores, view):
        import torch

        from ..merge import recycle_clusters

        out, centres = recycle_clusters(x, kept, scores, self.count, self.clusters)
        return out, torch.cat([kept, centres], dim=1)  # a cluster takes its centre's identity


class RecycleOption(RestOption):
    kind = "recycle"
    rank = 20
    model = Recycle
    rule = "recycle"
    grammar = """
recycle: _THEN _RECYCLE quantity _INTO quantity
"""
    keywords = {"_RECYCLE": ("recycle", "'recycle'")}
    then_words = "'then recycle N into M'"
    phrase = "'recycle'"
    yaml_keys = (YamlKey("recycle", " then recycle ", "quantity"), YamlKey("recycle_into", " into ", "quantity"))
    yaml_together = "recycle: N and recycle_into: M (`then recycle N into M`)"
    yaml_clash = ("a keep either merges the rest or recycles some of it, not both", "one of merge_rest_into or recycle")

    def build(self, b, tree):
        count, clusters = (b.quantity(c) for c in tree.children)
        return b.node(Recycle, b.span(tree), count=count, clusters=clusters)

    def text(self, node: Recycle) -> str:
        return f" then recycle {format_quantity(node.count)} into {format_quantity(node.clusters)}"

    def read_yaml(self, reader, m) -> Recycle:
        count, clusters = reader.key_value(m, "recycle"), reader.key_value(m, "recycle_into")
        return reader.node(Recycle, reader.join(m["recycle"][0], m["recycle_into"][1]), count=count,
                           clusters=clusters)

    def write_yaml(self, node: Recycle, item: dict) -> None:
        item["recycle"] = quantity_data(node.count)
        item["recycle_into"] = quantity_data(node.clusters)

    def legacy(self, data: dict) -> dict | None:
        old = data.pop("recycle", None)
        return None if old is None else {**old, "kind": "recycle"}

    def shares(self, node: Recycle) -> list:
        return [node.count]

    def resolve(self, node: Recycle, ctx: RestContext) -> Recycled | None:
        if ctx.adaptive and node.count.percent:
            ctx.error(f"'recycle {ctx.qty_text(node.count)}' is a share of the tokens this stage drops, whose count "
                      "varies per image after the adaptive count before it", node.count.span,
                      expected="a number of tokens", code="adaptive")
            return None
        if not ctx.first_term_scored("'recycle' ranks the dropped tokens by",
                                     "text(all) top 300 then recycle 83 into 9", "recycle"):
            return None
        dropped = ctx.leftover
        m = ctx.quantity(node.count, dropped)
        if not 1 <= m <= dropped:
            ctx.error(f"'recycle {ctx.qty_text(node.count)}' asks for {m} of the {dropped} tokens this stage drops",
                      node.count.span,
                      expected=f"between 1 and {dropped} tokens" if dropped else "a stage that drops tokens",
                      code="quantity")
            return None
        c = ctx.quantity(node.clusters, m)
        if not 1 <= c <= m:
            ctx.error(f"'into {ctx.qty_text(node.clusters)}' asks for {c} clusters of {m} recycled tokens",
                      node.clusters.span, expected=f"between 1 and {m} clusters", code="quantity")
            return None
        return Recycled(m, c)


OPTION = register(RecycleOption())
