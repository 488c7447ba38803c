"""`then merge rest into N`, `then add rest into N` and `... by keys` (VisionZip).

The tokens the terms did not keep are folded into N contextual tokens: the targets are N
of them at a uniform stride, every other one joins its most similar target (cosine of
the tokens, or with `by keys` of the head-mean attention keys of the ViT layer the first
term's score reads). A contextual token is the mean of its group (`merge`), or its target
plus the mean of the tokens joining it (`add`, VisionZip's exact rule). Cost: the R - N
joiners against the N targets, ``2·(R−N)·N·d`` (`by keys`: d = head width), R the most
tokens the terms can leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...lang.ast import Quantity, Rest
from ...lang.format import format_quantity
from ...lang.yaml_keys import YamlKey, quantity_data
from ...lang.scorers import by_canonical
from .base import MissingInput, RestContext, RestOption, RestPlan, register


class MergeRest(Rest):
    """`then merge|add rest into N [by keys]`."""

    kind: Literal["merge"] = "merge"
    into: Quantity
    # `add`: a contextual token is its target plus the mean of the tokens joining it,
    # not the mean of the group
    added: bool = False
    # `keys`: tokens join the target of most similar attention keys (head mean) of the
    # layer the first term's score reads
    by: Literal["tokens", "keys"] = "tokens"


@dataclass(frozen=True)
class Merged(RestPlan):
    into: int  # contextual tokens appended
    added: bool = False
    keys: int | None = None  # `by keys`: the ViT layer whose keys the match reads

    @property
    def tokens(self) -> int:
        return self.into

    @property
    def keys_layer(self) -> int | None:
        return self.keys

    def flops(self, stage, d: int, head_dim: int) -> int:
        t = self.into
        # R: the tokens the kept terms did not take (the most, under adaptive counts)
        rest = stage.tokens_in - (stage.fewest_out - stage.keep_cls - t)
        if not t or rest <= t:
            return 0
        return 2 * (rest - t) * t * (head_dim if self.keys is not None else d)

    def listing(self) -> str:
        if not self.into:
            return ""
        return f" then {'add' if self.added else 'merge'} rest into {self.into}" + (
            " by keys" if self.keys is not None else "")

    def run(self, x, kept, scores, view):
        import torch

        from ..merge import gather_tokens, merge_rest

        t = self.into
        if not t:
            return gather_tokens(x, kept), kept
        metric = None
        if self.keys is not None:
            if view.keys_of is None:
                raise MissingInput("'by keys' found no ViT keys")
            metric = view.keys_of(self.keys)
        out, _assign = merge_rest(x, kept, t, metric=metric, mode="visionzip" if self.added else "mean")
        # merge_rest's documented targets: the non-kept tokens of rank i * max(1, R // t),
        # whose identities the contextual tokens take.
        g, n, _ = x.shape
        rest = torch.ones(g, n, dtype=torch.bool, device=x.device)
        rest.scatter_(1, kept, False)
        r = n - kept.shape[1]
        rest_idx = rest.nonzero()[:, 1].view(g, r)
        step = max(1, r // t)
        targets = rest_idx[:, torch.arange(0, step * t, step, device=x.device)]
        return out, torch.cat([kept, targets], dim=1)


class MergeRestOption(RestOption):
    kind = "merge"
    rank = 10
    model = MergeRest
    rule = "merge_rest"
    grammar = """
merge_rest: _THEN _MERGE _REST _INTO quantity merge_by?
          | _THEN ADD _REST _INTO quantity merge_by?
// `by keys`: match on the attention keys of the layer the first term's score reads
merge_by: _BY KEYS
"""
    keywords = {"ADD": ("add", "'add'"), "KEYS": ("keys", "'keys'")}
    then_words = "'then merge rest into N'"
    hints = {"_MERGE": "after the keep terms, write 'then merge rest into N'"}
    phrase = "'merge rest into'"
    yaml_keys = (YamlKey("merge_rest_into", " then merge rest into ", "quantity"),
                 YamlKey("add_rest_into", " then add rest into ", "quantity"),
                 YamlKey("merge_by", " by ", None))

    def build(self, b, tree):
        parts = list(tree.children)
        added = not hasattr(parts[0], "data")  # the ADD token (a tree is the quantity)
        if added:
            parts.pop(0)
        return b.node(MergeRest, b.span(tree), into=b.quantity(parts[0]), added=added,
                      by="keys" if len(parts) > 1 else "tokens")

    def text(self, node: MergeRest) -> str:
        return (f" then {'add' if node.added else 'merge'} rest into {format_quantity(node.into)}"
                + (" by keys" if node.by == "keys" else ""))

    def read_yaml(self, reader, m) -> MergeRest:
        if "merge_rest_into" in m and "add_rest_into" in m:
            raise reader.fail("a keep either merges or adds the rest, not both", m["add_rest_into"][0],
                              expected="one of merge_rest_into or add_rest_into")
        key = "add_rest_into" if "add_rest_into" in m else "merge_rest_into"
        into = reader.key_value(m, key) if key in m else None
        last = m[key][1] if key in m else None
        by = "tokens"
        if "merge_by" in m:
            word, value = m["merge_by"]
            if into is None:
                raise reader.fail("'merge_by' belongs to merge_rest_into or add_rest_into", word,
                                  expected="merge_rest_into: N beside it")
            if not reader.is_word(value, "keys"):
                raise reader.fail("'merge_by' takes 'keys'", value, expected="merge_by: keys")
            by, last = "keys", value
        return reader.node(MergeRest, reader.join(m[key][0], last), into=into, added=key == "add_rest_into", by=by)

    def write_yaml(self, node: MergeRest, item: dict) -> None:
        item["add_rest_into" if node.added else "merge_rest_into"] = quantity_data(node.into)
        if node.by == "keys":
            item["merge_by"] = "keys"

    def legacy(self, data: dict) -> dict | None:
        into = data.pop("merge_rest", None)
        added, by = data.pop("merge_added", False), data.pop("merge_by", "tokens")
        if into is None:
            if added or by != "tokens":
                raise ValueError("'add' and 'by keys' belong to 'then merge rest into N'")
            return None
        return {"kind": "merge", "into": into, "added": added, "by": by}

    def shares(self, node: MergeRest) -> list:
        return [node.into]

    def resolve(self, node: MergeRest, ctx: RestContext) -> Merged | None:
        rest, leftover = ctx.quantity(node.into, ctx.tokens_in), ctx.leftover
        if rest > leftover:
            ctx.error(f"'merge rest into {ctx.qty_text(node.into)}' asks for {rest} contextual tokens, but only "
                      f"{leftover} tokens are left to merge", node.into.span,
                      expected=f"at most {leftover} contextual tokens", code="quantity")
            return None
        keys = None
        if node.by == "keys":
            keys = _keys_layer(node, ctx)
            if keys is None:
                return None
        return Merged(into=rest, added=node.added, keys=keys)


def _keys_layer(node: MergeRest, ctx: RestContext) -> int | None:
    """`by keys`: the ViT layer whose keys the first term's score read (VisionZip matches
    on the keys of the layer its CLS attention comes from)."""
    where = node.into.span
    if ctx.site.tower != "vit":
        ctx.error("'by keys' matches on a ViT layer's attention keys; this stage is in the LLM", where,
                  expected="'then merge rest into N' without 'by keys'", code="merge-keys")
        return None
    score = ctx.terms[0].score if ctx.terms else None
    obs = score.observation if score is not None and score.op == "leaf" else None
    if obs is None or obs.tower != "vit" or not by_canonical(obs.scorer).keys_match:
        ctx.error("'by keys' takes the keys of the layer the first term's score reads, so the first term must "
                  "be one ViT attention score", where,
                  expected="a first term such as 'cls top 161' (keys of the layer its attention comes from)",
                  code="merge-keys")
        return None
    return obs.layer


OPTION = register(MergeRestOption())
