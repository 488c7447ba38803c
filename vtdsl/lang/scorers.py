"""The vocabulary of scores and selectors: the one place to add a scorer.

The parser accepts a scorer name only if it is a key of `SCORERS`, and checks its
arguments against `ScorerInfo.args`; the IR reads `towers`, `canonical` and `queries` to
turn a `ScoreRef` into an `Observation`. Adding a scorer = one entry here (plus its
runtime kernel and cost in the later stages).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScorerInfo:
    """What the front end and the IR need to know about one scorer name."""

    name: str
    # Towers whose attention / hidden states the score can be read from.
    towers: tuple[str, ...]
    # Accepted argument values (at most `max_args` of them); () = takes no arguments.
    args: tuple[str, ...] = ()
    max_args: int = 0
    # The argument that applies when none is written.
    default_args: tuple[str, ...] = ()
    # The runtime scorer this name reads ("cls", "attn", "text", "norm", "knorm").
    canonical: str = ""
    # Attention query rows read, per argument tuple (see vtdsl.ir.plan.Queries).
    queries: dict[tuple[str, ...], str] | None = None
    summary: str = ""
    # Properties the later stages look up instead of testing names:
    # which projections of a layer the kernel reads ("q", "k", "v"; () = the hidden state),
    projections: tuple[str, ...] = ("q", "k")
    # whether it is a softmax attention map (head aggregates, `image_keys` in the LLM),
    attention: bool = True
    # whether `no_rope` has a meaning (it reads RoPE'd keys or queries),
    rope: bool = True
    # whether it reads the vision tower's CLS token,
    needs_cls: bool = False
    # and whether `by keys` may match on the keys it captured.
    keys_match: bool = False

    def queries_for(self, args: tuple[str, ...] | list[str]) -> str:
        args = tuple(args) or self.default_args
        assert self.queries is not None
        return self.queries[args]


SCORERS: dict[str, ScorerInfo] = {
    "cls": ScorerInfo(
        "cls", ("vit",), canonical="cls", queries={(): "cls"}, needs_cls=True, keys_match=True,
        summary="attention paid by the CLS token (ViT only)",
    ),
    "attn": ScorerInfo(
        "attn", ("vit", "llm"), args=("visual",), max_args=1, canonical="attn",
        queries={(): "all", ("visual",): "visual"}, keys_match=True,
        summary="mean attention received, over heads and queries; attn(visual): from the visual "
                "tokens' queries only (LLM)",
    ),
    "text": ScorerInfo(
        "text", ("llm",), args=("last", "all", "raters"), max_args=1, default_args=("last",),
        canonical="text", queries={("last",): "last_text", ("all",): "all_text", ("raters",): "raters"},
        summary="attention from the last text token; text(all): mean over all text tokens; text(raters): "
                "over SparseVLM's raters (LLM only)",
    ),
    "norm": ScorerInfo(
        "norm", ("vit", "llm"), canonical="norm", queries={(): "none"},
        projections=(), attention=False, rope=False,
        summary="L2 norm of the token's hidden state",
    ),
    "knorm": ScorerInfo(
        "knorm", ("vit", "llm"), canonical="knorm", queries={(): "none"},
        projections=("k",), attention=False, keys_match=True,
        summary="L1 norm of the token's attention key over all heads (LLM: with RoPE, as cached, "
                "unless no_rope); DART's pivots",
    ),
    "vnorm": ScorerInfo(
        "vnorm", ("vit",), canonical="vnorm", queries={(): "none"},
        projections=("v",), attention=False, rope=False,
        summary="L1 norm of the token's value averaged over heads (FlowCut; ViT only)",
    ),
    "vsim": ScorerInfo(
        "vsim", ("vit",), canonical="vsim", queries={(): "cls"},
        projections=("v",), attention=False, rope=False, needs_cls=True,
        summary="softmax of the CLS value's dot product with the token's value, head mean "
                "(FlowCut's semantic attention; ViT only)",
    ),
    "anchors": ScorerInfo(
        "anchors", ("vit", "llm"), canonical="attn", queries={(): "all"}, keys_match=True,
        summary="HiPrune anchor tokens: scored like attn",
    ),
    "registers": ScorerInfo(
        "registers", ("vit", "llm"), canonical="attn", queries={(): "all"}, keys_match=True,
        summary="HiPrune register tokens: scored like attn",
    ),
}



def by_canonical(canonical: str) -> ScorerInfo:
    """The properties of the runtime scorer an `Observation.scorer` names."""
    return next(info for info in SCORERS.values() if info.canonical == canonical)


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
