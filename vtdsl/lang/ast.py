"""Typed AST of a vtdsl policy.

Every node carries the source span it came from. Spans are location metadata, not
identity: two ASTs that differ only in where they were written compare equal, which is
what makes `.vt` -> AST -> YAML -> AST round trips checkable with `==`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_serializer,
                      model_validator)

# Limits that keep every quantity meaningful and every integer small enough to print.
MAX_COUNT = 1_000_000
MAX_LAYER = 10_000
MAX_LOF_NEIGHBOURS = 4096  # LOF compares every pair of a stage's tokens: more neighbours than that is a typo
MAX_BUDGET = 10**24  # absolute budgets (FLOPs, tokens, KV entries)


class Span(BaseModel):
    """1-based, end-inclusive line/column range of a construct in its source file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line: int
    column: int
    end_line: int
    end_column: int

    def __eq__(self, other: object) -> bool:  # spans never distinguish two ASTs
        return isinstance(other, Span)

    def __hash__(self) -> int:
        return 0


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid")

    span: Span | None = Field(default=None, repr=False)

    def __eq__(self, other: object) -> bool:
        """Equal when every field but `span` is equal: a node built in Python (span None)
        equals the same node parsed from a file."""
        if not isinstance(other, Node) or type(self) is not type(other):
            return NotImplemented
        return all(
            getattr(self, name) == getattr(other, name) for name in type(self).model_fields if not name.endswith("span")
        )

    __hash__ = None  # type: ignore[assignment]  # mutable models are unhashable


class Site(Node):
    """Where in the model a stage acts or a score is read.

    `vit.layerN`: the token set entering ViT layer N (negative N counts from the end).
    `vit.out` (index None): the features handed to the projector.
    `llm.layerN`: the visual tokens entering LLM layer N.
    """

    tower: Literal["vit", "llm"]
    index: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "Site":
        if self.index is None and self.tower != "vit":
            raise ValueError("only 'vit.out' has no layer index; use llm.layerN")
        if self.index is not None and abs(self.index) > MAX_LAYER:
            raise ValueError(f"layer index {self.index} is out of any model's range")
        return self

    def text(self) -> str:
        return f"{self.tower}.out" if self.index is None else f"{self.tower}.layer{self.index}"


class Quantity(Node):
    """A token count, or a percentage of the tokens entering the stage."""

    value: float | int
    percent: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Quantity":
        if self.percent:
            if not 0 <= self.value <= 100:
                raise ValueError(f"a percentage must lie in 0..100, got {self.value}%")
        else:
            if isinstance(self.value, float):
                if not self.value.is_integer():
                    raise ValueError(f"a token count must be a whole number, got {self.value}")
                self.value = int(self.value)
            if not 0 <= self.value <= MAX_COUNT:
                raise ValueError(f"a token count must lie in 0..{MAX_COUNT}, got {self.value}")
        return self

    def fraction(self) -> Fraction:
        """The value exactly: a percent written 12.5 is 25/2, never a binary float."""
        return Fraction(self.value) if isinstance(self.value, int) else Fraction(repr(self.value))

    def of(self, n: int) -> int:
        """Tokens this quantity selects out of `n` selectable tokens.

        A count is itself; a percentage p is rounded half up, exactly:
        floor(n * p / 100 + 1/2). (Capping at n is the caller's decision.)
        """
        if not self.percent:
            return int(self.value)
        return math.floor(n * self.fraction() / 100 + Fraction(1, 2))


class ScoreRef(Node):
    """A named scorer, optional arguments (`text(all)`), optional observation site (`@`).

    A layer range (`cls@vit.layer8..22 sum`): `at` is its first layer, `to` the last
    (as written, negative from the end allowed) and `over` the aggregate; the IR unrolls
    it into `over(cls@vit.layer8, ..., cls@vit.layer22)`."""

    kind: Literal["ref"] = "ref"
    name: str
    args: list[str] = Field(default_factory=list)
    at: Site | None = None
    to: int | None = None
    over: Literal["mean", "sum", "max", "ema"] | None = None
    # How attention is reduced over heads (`cls(max)`); None = the mean. An int H: the
    # mean over the H heads that give the visual tokens the most attention in total
    # (`text(all, top 14 heads)`, SparseVLM v2), chosen per attention map.
    # "whole": q and k as one head of the full width (`cls(whole)`).
    heads: Literal["mean", "sum", "max", "whole"] | Annotated[int, Field(ge=1, le=MAX_LAYER)] | None = None
    # The attention criterion computed without rotary position embeddings (FEATHER).
    no_rope: bool = False
    # The attention softmax taken over the image tokens' keys only (FEATHER; LLM).
    image_keys: bool = False

    @model_validator(mode="after")
    def _check_range(self) -> "ScoreRef":
        if (self.to is None) != (self.over is None):
            raise ValueError("a layer range needs its last layer and an aggregate (mean, sum or max)")
        if self.to is not None and (self.at is None or self.at.index is None or abs(self.to) > MAX_LAYER):
            raise ValueError("a layer range runs between two layers of one tower, e.g. vit.layer8..22")
        return self


class ScoreCombine(Node):
    """An aggregate of several scores (e.g. CLS attention averaged over layers), each
    optionally multiplied by a constant weight (`sum(cls, 0.09 * norm)`)."""

    kind: Literal["combine"] = "combine"
    op: Literal["mean", "sum", "max", "prod", "share"]
    args: list["Score"] = Field(min_length=1)
    # one per argument; None when no argument is weighted (all 1)
    weights: list[float] | None = None
    # `prod(...)@vit.layer0..21 ema`: the whole combination read at every layer of a range
    # (its scores take their layer from it), aggregated; as for ScoreRef
    at: Site | None = None
    to: int | None = None
    over: Literal["mean", "sum", "max", "ema"] | None = None

    @model_validator(mode="after")
    def _check_weights(self) -> "ScoreCombine":
        if (self.to is None) != (self.over is None) or (self.to is None) != (self.at is None):
            raise ValueError("a layer range needs its first and last layer and an aggregate")
        if (self.op == "share") != (len(self.args) == 1):
            raise ValueError("share(...) takes one score; the other combinations two or more")
        if self.weights is not None:
            if len(self.weights) != len(self.args):
                raise ValueError("a combination has one weight per score")
            if not all(math.isfinite(w) for w in self.weights):
                raise ValueError("a weight must be a finite number")
        return self


Score = Annotated[Union[ScoreRef, ScoreCombine], Field(discriminator="kind")]
ScoreCombine.model_rebuild()


class Adaptive(Node):
    """A count decided per image (`top N by ...`); N is its bound.

    `outliers`: the tokens whose score exceeds Q3 + 1.5 IQR of the stage's scores, at
    least 1 and at most N (PruMerge). `entropy`: of the a tokens available to the term,
    ``round((a - N)(1 - H^2) / sqrt(steps))`` are removed, never leaving fewer than N,
    H = the normalised entropy of `score` over the candidates (FlowCut). `lof`: the share of
    the scores that a `neighbours`-neighbour Local Outlier Factor calls outliers, of the
    tokens available (`of_rest`: the share among the tokens left, of the tokens kept so far),
    at most N (Recoverable Compression)."""

    kind: Literal["outliers", "entropy", "lof"]
    score: Score | None = None
    steps: int | None = Field(default=None, ge=1, le=MAX_LAYER)
    neighbours: int | None = Field(default=None, ge=1, le=MAX_LOF_NEIGHBOURS)
    of_rest: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Adaptive":
        if (self.kind == "entropy") != (self.score is not None and self.steps is not None):
            raise ValueError("'by entropy(score) over N layers' names a score and a layer count; 'by outliers' neither")
        if (self.kind == "lof") != (self.neighbours is not None) or (self.of_rest and self.kind != "lof"):
            raise ValueError("'by lof(K)' / 'by lof(K, rest)' names a neighbour count; no other rule does")
        return self


class TopTerm(Node):
    """`<score> top <qty> [by ...]`: the highest-scoring tokens not yet kept."""

    kind: Literal["top"] = "top"
    score: Score
    qty: Quantity
    adaptive: Adaptive | None = None


class SelectTerm(Node):
    """`diverse|uniform|random|unique|far <qty>`: a score-free selector."""

    kind: Literal["diverse", "uniform", "random", "unique", "far"]
    qty: Quantity
    seed: int | None = None
    # diverse: "min" = max-min (k-center, DivPrune), "sum" = max-sum diversification (ToDRE)
    spread: Literal["min", "sum"] = "min"
    # far: N text tokens (after the image) ranked by `pivot_score` join the pivots (DART)
    text_pivots: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    pivot_score: Score | None = None
    # far(norm): cosine of the hidden states after the LLM's final RMSNorm (DART)
    normed: bool = False

    @model_validator(mode="after")
    def _check(self) -> "SelectTerm":
        if self.seed is not None and self.kind != "random":
            raise ValueError(f"'seed' belongs to 'random', not to '{self.kind}'")
        if self.spread != "min" and self.kind != "diverse":
            raise ValueError(f"'(sum)' belongs to 'diverse', not to '{self.kind}'")
        if (self.text_pivots is None) != (self.pivot_score is None):
            raise ValueError("text pivots need a count and a score: 'with 4 text pivots by knorm'")
        if self.text_pivots is not None and self.kind != "far":
            raise ValueError(f"text pivots belong to 'far', not to '{self.kind}'")
        if self.normed and self.kind != "far":
            raise ValueError(f"'(norm)' belongs to 'far', not to '{self.kind}'")
        return self


class BuffersTerm(Node):
    """`buffers [<qty>]`: spatial 4-neighbours of the tokens already kept by this stage."""

    kind: Literal["buffers"] = "buffers"
    qty: Quantity | None = None


class ClsTokenTerm(Node):
    """`cls_token`: the CLS token itself, handed to the projector ahead of the kept patches
    at a `vit.out` where the select strategy drops it (VisionZip feeds CLS + dominant
    patches). One token, not counted in the stage's percentages."""

    kind: Literal["cls_token"] = "cls_token"


Term = Annotated[Union[TopTerm, SelectTerm, BuffersTerm, ClsTokenTerm], Field(discriminator="kind")]


class Region(Node):
    """`per crop` (each anyres crop), `per frame` (each temporal group of a video), `per
    region RxC` (a spatial split), `per chunk N` (N contiguous runs of the tokens in
    order), `per window N` (runs of N consecutive frames) or `per segment C [below T]`
    (FastVID's segments of similar consecutive frames); the budget is shared evenly, or
    with `proportional` in proportion to each region's mean score."""

    kind: Literal["crop", "frame", "region", "chunk", "window", "segment"]
    rows: int | None = None
    cols: int | None = None
    chunks: int | None = None
    window: int | None = None  # `per window N`: frames per window
    segments: int | None = None  # `per segment C`: the fewest segments
    below: float | None = None  # `per segment C below T`: also cut where consecutive frames' cosine < T
    proportional: bool = False
    # `per frame softmax T`: VidCom2's frame budgets at temperature T (> 0)
    softmax: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "Region":
        if self.kind == "region" and (not self.rows or not self.cols or self.rows < 1 or self.cols < 1):
            raise ValueError("'per region' needs a positive RxC split such as 2x2")
        if self.kind == "crop" and (self.rows is not None or self.cols is not None or self.proportional):
            raise ValueError("'per crop' takes no RxC split and no 'proportional'")
        if self.kind == "chunk" and (not self.chunks or self.chunks < 1 or self.rows is not None):
            raise ValueError("'per chunk' needs a positive number of chunks such as 16")
        if self.kind in ("frame", "window", "segment") and (self.rows is not None or self.cols is not None):
            raise ValueError(f"'per {self.kind}' takes no RxC split")
        if self.kind != "chunk" and self.chunks is not None:
            raise ValueError("only 'per chunk' takes a chunk count")
        if (self.kind == "window") != (self.window is not None) or (self.window is not None and self.window < 1):
            raise ValueError("'per window' (and only it) takes a positive number of frames such as 4")
        if (self.kind == "segment") != (self.segments is not None) or (self.segments is not None
                                                                       and self.segments < 1):
            raise ValueError("'per segment' (and only it) takes a positive number of segments such as 8")
        if self.below is not None and (self.kind != "segment" or not -1 <= self.below <= 1):
            raise ValueError("'below T' follows 'per segment C' only, with a cosine T between -1 and 1")
        if self.softmax is not None and (self.kind != "frame" or self.proportional or not self.softmax > 0):
            raise ValueError("'softmax T' follows 'per frame' only, without 'proportional', with a temperature T > 0")
        return self


class Rest(Node):
    """What a keep does with the tokens its terms leave (`then ...`): one subclass per
    option, each in its module of `vtdsl.ops.rest` (`kind` names the option)."""

    kind: str


class Keep(Node):
    """`keep term + term ... [per ...] [then <what happens to the rest>]`."""

    kind: Literal["keep"] = "keep"
    terms: list[Term] = Field(min_length=1)
    region: Region | None = None
    # One of the registered options (vtdsl.ops.rest), a union discriminated by `kind`.
    rest: SerializeAsAny[Rest] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fields_before_rest(cls, data):
        """JSON from before `rest` named each option in a field of its own."""
        if isinstance(data, dict) and not set(data) <= set(cls.model_fields):
            from ..ops import rest as options

            return options.read_legacy(data)
        return data

    @field_validator("rest", mode="before")
    @classmethod
    def _one_option(cls, value):
        if isinstance(value, dict):
            from ..ops import rest as options

            return options.validate(value)
        return value


class Merge(Node):
    """`merge <r>`: ToMe bipartite soft matching of r token pairs; or `merge static <q> per
    window N | per segment C`: DyCoke's temporal token merging, `pairs` then the share of
    each non-first frame of a window (segment) that merges into its reference frame."""

    kind: Literal["merge"] = "merge"
    pairs: Quantity
    static: bool = False
    region: Region | None = None  # `static` only: its windows or segments

    @model_validator(mode="after")
    def _check(self) -> "Merge":
        if self.static != (self.region is not None):
            raise ValueError("'merge static' (and only it) takes 'per window N' or 'per segment C'")
        return self


class Pool(Node):
    """`pool RxC`: spatial average pooling of the token grid."""

    kind: Literal["pool"] = "pool"
    rows: int = Field(ge=1, le=64)
    cols: int = Field(ge=1, le=64)


class DropAll(Node):
    """`drop all`: no visual tokens from this site on."""

    kind: Literal["drop"] = "drop"


Action = Annotated[Union[Keep, Merge, Pool, DropAll], Field(discriminator="kind")]


class Repeat(Node):
    """`every [N layers | layer] from <site> to <site>`: the stage's action at layers
    start, start+N, ... up to end (inclusive), each a stage of its own."""

    step: int = Field(ge=1, le=MAX_LAYER)
    end: Site


class Stage(Node):
    site: Site  # a repeated stage's first site (`from`)
    action: Action
    repeat: Repeat | None = None
    # LLM stages: the tokens after the cut get contiguous RoPE positions (`renumber`)
    # instead of keeping their own, in prefill and in every decode step.
    renumber: bool = False
    renumber_span: Span | None = Field(default=None, repr=False, exclude=True)


class Budget(Node):
    """`budget <metric> <op> <value>`; a percent value is relative to the unpruned model."""

    # latency / decode_latency: predicted seconds (prefill / one decode step) on a device
    # profile the checker is given (vtdsl.cost.latency).
    metric: Literal["flops", "flops_fastv", "tokens", "kv", "latency", "decode_latency"]
    op: Literal["<=", "<"]
    value: float | int
    percent: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Budget":
        if (isinstance(self.value, float) and not math.isfinite(self.value)) or self.value < 0:
            raise ValueError(f"a budget must be a non-negative number, got {self.value}")
        if self.percent and self.value > 100:
            raise ValueError(f"a percentage must lie in 0..100, got {self.value}%")
        if not self.percent and self.value > MAX_BUDGET:
            raise ValueError(f"a budget must be at most 1e24, got {self.value}")
        return self


class DecodeSelect(Node):
    """`during decode at llm.layerN attend top K`: at every generated token, layers N and
    after attend only to the K visual KV entries (a count, or a percentage of the visual
    entries in the cache) that the new token's query weighs most at layer N-1 (mean over
    heads); text entries are always attended and the cache itself is kept (DyCoke's
    dynamic pruning). Prefill is unchanged."""

    site: Site
    qty: Quantity | None = None
    # top-p: the fewest visual entries whose attention reaches this share of the attention
    # all visual entries get (`attend top p 0.9`), instead of a count
    mass: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "DecodeSelect":
        if (self.qty is None) == (self.mass is None):
            raise ValueError("a decode stage attends to top K entries or to top p P of the attention, one of them")
        if self.mass is not None and not 0 < self.mass <= 1:
            raise ValueError(f"'top p' takes a share of the attention in (0, 1], got {self.mass}")
        return self


class Policy(Node):
    name: str | None = None
    model: str | None = None
    # Where the `model` line is, so a model mismatch can point at it (not part of the AST's identity).
    model_span: Span | None = Field(default=None, repr=False, exclude=True)
    budgets: list[Budget] = Field(default_factory=list)
    stages: list[Stage] = Field(default_factory=list)
    decode: list[DecodeSelect] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _without_empty_decode(self, handler):
        """JSON of a policy without decode stages stays as it was before they existed."""
        data = handler(self)
        if isinstance(data, dict) and not data.get("decode"):
            data.pop("decode", None)
        return data
