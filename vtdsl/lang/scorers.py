"""The vocabulary of scores and selectors the front end reads.

The scorers themselves live in `vtdsl.ops.scorers` (one module per family: arguments,
properties, cost and kernel together); this module re-exports their registry for the
parser and the IR. The parser accepts a scorer name only if it is a key of `SCORERS`, and
checks its arguments against `ScorerInfo.args`. Importing it does not import torch.
"""

from __future__ import annotations

from ..ops.scorers import SCORERS, ScorerInfo, by_canonical

__all__ = ["SCORERS", "ScorerInfo", "by_canonical", "SELECTORS", "COMBINERS", "MAX_SCORE_DEPTH"]

# Score-free selectors (`diverse 64`), in the order error messages list them.
SELECTORS: dict[str, str] = {
    "diverse": "greedy max-min (k-center) on cosine distance of hidden states",
    "uniform": "evenly strided over the remaining tokens in grid order",
    "unique": "duplication-aware: greedily keep the token least similar to those kept",
    "random": "uniformly at random, optionally with `seed N`",
    "far": "pivot-based duplicate removal (DART): each pivot takes the tokens least similar to it",
}

# Aggregates of several scores: `mean(s1, s2, ...)`.
COMBINERS: tuple[str, ...] = ("mean", "sum", "max", "prod", "share")

# Nesting limit for `mean(mean(...))`: deeper input is refused with a located error.
MAX_SCORE_DEPTH = 8
