"""What a scorer is: its `ScorerInfo` entry, the context its kernel reads, and the registry.

Every stage asks the entry instead of testing names: the parser its arguments and which
options mean something (`attention`, `rope`), the IR where it may be read (`towers`,
`needs_cls`, `reads_layer_output`, `on_input`, `keys_match`), the cost model its `cost`,
the compiler which projections to capture (`projections`) and its `kernel`.

Nothing here imports torch: the front end (`vtdsl parse`) reads the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..._ranked import add_ranked


@dataclass(frozen=True)
class ScoreSize:
    """The quantities a score's cost depends on, per image, at the layer it reads."""

    n: int  # keys: ViT tokens entering the layer (CLS included); LLM: the sequence length there
    visual: int  # visual tokens among them
    text: int  # text (non-image) positions; 0 in the ViT
    width: int  # heads · head width of the tower
    head_width: int = 0  # one head's width (a head-mean key is this wide)


@dataclass
class ScoreContext:
    """One calling convention for every kernel and both towers: an observation and what the
    runtime captured for it.

    A ViT kernel returns float32 ``[B, n - lead]`` (the patches); an LLM kernel float32
    ``[B, n]`` over the rows the layer ran on.
    """

    obs: Any  # vtdsl.ir.plan.Observation: queries, heads, rope, image_keys, tower, layer
    # "h": the layer's output hidden state; "q", "k", "v": ``[B, n, H·dh]`` projection outputs
    captured: Mapping[str, Any]
    heads: int  # attention (query) heads of the tower
    kv_heads: int = 0  # LLM key/value heads (GQA)
    lead: int = 0  # ViT rows before the patches (CLS)
    layer: Callable[[int], Any] | None = None  # the tower's decoder / encoder layer module i
    # LLM only: what the layer was handed, for the rows it ran on
    position_embeddings: tuple | None = None  # (cos, sin) ``[B or 1, n, dh]``
    mask: Any = None  # the 4-D mask, or None
    is_img: Any = None  # ``[B, n]`` bool
    raters: Any = None  # ``[B, n]`` bool: SparseVLM's raters among the rows (`text(raters)`)
    scaling: float | None = None  # the attention's logit scale
    # ``[B, n]`` int64 frame (temporal group) and in-frame position of each visual row from
    # the input's token layout (-1 on text rows; a frame-less image is frame 0); None: unknown
    frame: Any = None
    frame_pos: Any = None
    # what the user installed beside the checkpoint: `clip_text`'s auxiliary CLIP encoder
    aux: Any = None


def no_cost(obs: Any, size: ScoreSize) -> int:
    """A score that is no matmul (norms of captured tensors): nothing counted."""
    return 0


@dataclass(frozen=True)
class ScorerInfo:
    """Everything about one scorer name."""

    name: str
    # Towers whose attention / hidden states the score can be read from.
    towers: tuple[str, ...]
    # Accepted argument values (at most `max_args` of them); () = takes no arguments.
    args: tuple[str, ...] = ()
    max_args: int = 0
    # The argument that applies when none is written.
    default_args: tuple[str, ...] = ()
    # The runtime scorer this name reads (`Observation.scorer`); entries that share one
    # share its kernel and cost (the first entry of a canonical name defines them).
    canonical: str = ""
    # Attention query rows read, per argument tuple (see vtdsl.ir.plan.Queries).
    queries: dict[tuple[str, ...], str] | None = None
    summary: str = ""
    # which projections of a layer the kernel reads ("q", "k", "v"; () = the layer's output),
    projections: tuple[str, ...] = ("q", "k")
    # whether it is a softmax attention map (head aggregates, `image_keys` in the LLM),
    attention: bool = True
    # whether `no_rope` has a meaning (it reads RoPE'd keys or queries),
    rope: bool = True
    # whether it reads the vision tower's CLS token,
    needs_cls: bool = False
    # whether `by keys` may match on the keys it captured,
    keys_match: bool = False
    # and whether it may be read on an LLM layer's own input (PyramidDrop's rule).
    on_input: bool = True
    # Position in listings (error messages, docs): lower first.
    rank: int = 100
    # Why a tower outside `towers` cannot read it: '{name}' and '{where}' are filled in.
    tower_error: str = "'{name}' is only available at ViT layers (the LLM sees no CLS token), not at {where}"
    # A check of one observation against the model: (obs, spec) -> what is wrong, or None.
    check: Callable[[Any, Any], str | None] | None = field(default=None, compare=False)
    # Extra counted FLOPs of one observation, per image (docs/dev/contracts.md "Scores").
    cost: Callable[[Any, ScoreSize], int] = field(default=no_cost, compare=False)
    # The runtime kernel: ScoreContext -> float32 scores (see ScoreContext).
    kernel: Callable[[ScoreContext], Any] | None = field(default=None, compare=False)

    @property
    def reads_layer_output(self) -> bool:
        """It reads a layer's output hidden state, not what the layer computed from its
        input: read after the layer ran (also at layer -1, the embeddings), never on a
        layer's own input."""
        return not self.projections

    def queries_for(self, args: tuple[str, ...] | list[str]) -> str:
        args = tuple(args) or self.default_args
        assert self.queries is not None
        return self.queries[args]


SCORERS: dict[str, ScorerInfo] = {}


def register(*entries: ScorerInfo) -> None:
    """Add a family module's entries to `SCORERS` (a name is registered once), kept in
    `rank` order whatever order the family modules are imported in."""
    for info in entries:
        add_ranked(SCORERS, info.name, info, "scorer")


def by_canonical(canonical: str) -> ScorerInfo:
    """The entry of the runtime scorer an `Observation.scorer` names."""
    return next(info for info in SCORERS.values() if info.canonical == canonical)
