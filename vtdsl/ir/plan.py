"""The resolved, checked form of a policy against one model: what cost and compiler read.

The IR graph (`vtdsl.ir.graph`) is the source of truth; a `Plan` is its flat view, in
execution order, with every site, score and quantity resolved to concrete numbers.

Token-count conventions (all per image, batch-independent):
- `vit_tokens[i]`: tokens entering ViT layer i, CLS included when the tower has one.
- `projector_tokens`: visual tokens entering the projector (after the feature-select
  strategy and any `vit.out` stage).
- `image_placeholders`: visual tokens the LLM receives per image, i.e. image placeholder
  tokens in the prompt (the projector's output plus LLaVA-NeXT's newline tokens).
- `llm_visual[j]`: visual tokens entering LLM layer j.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..lang.ast import Policy, Span
from ..lang.errors import Diagnostic
from ..models.spec import ModelSpec
from ..ops.rest.base import RestPlan

Tower = Literal["vit", "llm"]
# Which attention rows a score reads (queries); "none" for scores without attention.
# "raters": SparseVLM's text raters, the question tokens most relevant to the image.
Queries = Literal["cls", "all", "last_text", "last4_text", "all_text", "raters", "visual", "none"]


@dataclass(frozen=True)
class ResolvedSite:
    """A site with a non-negative layer index. `vit.out` is `("vit", None)`."""

    tower: Tower
    layer: int | None

    def text(self) -> str:
        return f"{self.tower}.out" if self.layer is None else f"{self.tower}.layer{self.layer}"


@dataclass(frozen=True)
class Observation:
    """A score read inside one layer (the attention / hidden states computed there)."""

    scorer: str  # canonical scorer: "cls", "attn", "text", "norm"
    args: tuple[str, ...]
    tower: Tower
    layer: int  # the layer whose attention / output is read
    queries: Queries
    # Read on the layer's input, before a stage entering that layer chooses its tokens:
    # the layer's own input norm and q/k projections (+ RoPE) applied to the tokens
    # entering it (PyramidDrop's rule). Written as a score @ the stage's own LLM layer.
    on_input: bool = False
    # Reduction of the attention over heads (`cls(max)`): "mean" (default), "sum", "max",
    # or an int H: the mean over the H heads with the most attention on the visual tokens.
    heads: str | int = "mean"
    # False: q and k without rotary position embeddings (`text(no_rope)`, FEATHER; LLM only).
    rope: bool = True
    # True: the softmax over the image tokens' keys only (`text(image_keys)`, FEATHER; LLM only).
    image_keys: bool = False


@dataclass(frozen=True)
class ResolvedScore:
    """A leaf observation, or an aggregate ("mean", "sum", "max", "prod") of several, each
    multiplied by its weight first (`weights`: one per argument, or None for all 1)."""

    op: Literal["leaf", "mean", "sum", "max", "prod", "share"]
    observation: Observation | None = None
    args: tuple["ResolvedScore", ...] = ()
    weights: tuple[float, ...] | None = None

    def observations(self) -> list[Observation]:
        if self.op == "leaf":
            return [self.observation]
        return [o for a in self.args for o in a.observations()]


@dataclass(frozen=True)
class ResolvedAdaptive:
    """A count decided per image (`top N by outliers`, `top N by entropy(s) over L layers`,
    `top N by lof(K[, rest])`).

    `bound`: outliers and lof, the most tokens kept; entropy, the fewest (the N written)."""

    kind: Literal["outliers", "entropy", "lof"]
    bound: int
    steps: int = 1
    score: ResolvedScore | None = None  # entropy: whose entropy slows the cut
    neighbours: int = 0  # lof: K
    of_rest: bool = False  # lof: the share among the tokens left, of the tokens kept


@dataclass(frozen=True)
class ResolvedTerm:
    kind: Literal["top", "diverse", "uniform", "random", "unique", "buffers", "far"]
    count: int  # tokens this term adds (buffers: the resolved upper bound; adaptive: the most)
    score: ResolvedScore | None = None
    seed: int | None = None
    spread: Literal["min", "sum"] = "min"  # diverse: max-min or max-sum
    span: Span | None = None
    adaptive: ResolvedAdaptive | None = None
    min_count: int | None = None  # adaptive: the fewest tokens it adds (None: `count`)
    # far: the text pivots (LLM) and the score ranking them; each pivot takes per_pivot
    text_pivots: int = 0
    pivot_score: ResolvedScore | None = None
    per_pivot: int = 0
    normed: bool = False  # far(norm): hidden states after the LLM's final norm


@dataclass(frozen=True)
class ResolvedStage:
    index: int  # position in the source policy
    site: ResolvedSite
    # "static": `merge static` (DyCoke's TTM), which keeps input rows as a keep does
    action: Literal["keep", "merge", "pool", "drop", "static"]
    tokens_in: int  # selectable visual tokens entering the stage (CLS excluded)
    tokens_out: int
    terms: tuple[ResolvedTerm, ...] = ()
    region: tuple[str, int, int] | None = None  # ("region", rows, cols) or ("crop", 0, 0)
    # `per region RxC proportional`: shares follow each region's mean of the first term's score
    region_proportional: bool = False
    # `per frame softmax T`: VidCom2's frame budgets from the first term's frame means
    region_softmax: float | None = None
    # `per segment C below T`: also cut the clip where consecutive frames' cosine is below T
    below: float | None = None
    merge_rest: int = 0  # merge (ToMe): pairs merged; static: tokens merged in each non-first frame
    pool: tuple[int, int] | None = None
    # keep: the CLS token goes ahead of the kept patches (`cls_token`, vit.out only);
    # counted in tokens_out, not in the terms.
    keep_cls: bool = False
    # LLM: the rows after the stage get contiguous positions (ast.Stage.renumber)
    renumber: bool = False
    # keep: what happens to the tokens the terms leave (`then ...`), resolved by its
    # option (vtdsl.ops.rest); the tokens it hands on (`rest.tokens`) count in tokens_out
    rest: RestPlan | None = None
    span: Span | None = None
    # Adaptive counts (`top N by ...`) make token counts data-dependent: tokens_in /
    # tokens_out are then upper bounds (what the cost model charges) and these the lower
    # bounds (what later quantities are checked against). None: the count is exact.
    tokens_in_min: int | None = None
    tokens_out_min: int | None = None

    @property
    def fewest_in(self) -> int:
        return self.tokens_in if self.tokens_in_min is None else self.tokens_in_min

    @property
    def copies_rows(self) -> bool:
        """Whether the stage's output tokens are input rows unchanged (a plain keep or drop),
        so the pruned sequence is one gather of the hidden states."""
        return self.action in ("keep", "drop", "static") and not (self.rest is not None and self.rest.merges)

    @property
    def fewest_out(self) -> int:
        return self.tokens_out if self.tokens_out_min is None else self.tokens_out_min


@dataclass
class DecodeSelection:
    """A checked decode stage: at every generated token, LLM layers `layer`.. attend only
    to the `k` (of `visual`) visual KV entries that the new token's query weighs most at
    layer `layer - 1` (mean over heads); text entries always."""

    layer: int
    k: int  # under `mass`: its bound, every visual entry
    visual: int
    percent: bool = False
    text: str = ""
    # top-p: the fewest entries whose attention reaches this share of the visual entries'
    mass: float | None = None


@dataclass
class Plan:
    policy: Policy
    spec: ModelSpec
    stages: list[ResolvedStage]
    vit_tokens: list[int]
    projector_tokens: int
    llm_visual: list[int]
    diagnostics: list[Diagnostic] = field(default_factory=list)
    image_placeholders: int = -1  # -1: the projector's count (set by `vtdsl.ir.check`)
    decode: list[DecodeSelection] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image_placeholders < 0:
            self.image_placeholders = self.spec.llm_entry_tokens(self.projector_tokens)

    @property
    def visual_tokens_to_llm(self) -> int:
        return self.llm_visual[0] if self.llm_visual else self.projector_tokens

    @property
    def observations(self) -> list[Observation]:
        seen: dict[Observation, None] = {}
        for stage in self.stages:
            for term in stage.terms:
                scores = [term.score, term.pivot_score]
                if term.adaptive is not None:
                    scores.append(term.adaptive.score)
                for score in scores:
                    if score is not None:
                        for obs in score.observations():
                            seen.setdefault(obs, None)
        return list(seen)

    @property
    def adaptive(self) -> bool:
        """Whether some stage's count is decided per image (`top N by ...`)."""
        return any(t.adaptive is not None for s in self.stages for t in s.terms)
