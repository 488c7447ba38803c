"""What one "what happens to the rest" option declares, and the table of them.

A `keep` stage's terms choose tokens; an option after `then` decides what becomes of the
tokens they leave (merged into contextual tokens, clustered, absorbed, pooled per cell).
Each option is one module of this package with one `RestOption` subclass that owns, in
pipeline order:

- lang: its grammar rule and keywords (`rule`, `grammar`, `keywords`, `then_words`,
  `hints`), the AST node it builds (`model`, `build`), its canonical text (`text`), its
  YAML keys (`yaml_keys`, `read_yaml`, `write_yaml`) and the fields older JSON ASTs
  used for it (`legacy`);
- ir: its checks and resolved counts (`resolve`, a `RestPlan`), and which of its
  quantities are shares of the stage's tokens (`shares`);
- cost, compiler: on the `RestPlan`, its FLOPs (`flops`), its runtime op (`run`) and its
  listing text (`listing`).

`register` keeps the table in `rank` order (the order messages list the options in), so
adding an option is one new module; the parser, formatter, YAML form, IR, cost model,
runtime and listing loop over `options()` and never name one.

Nothing here imports torch: the front end (`vtdsl parse`) reads the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from ..._ranked import add_ranked


class MissingInput(ValueError):
    """A runtime op found no input it needs (the compiler names the stage)."""


@dataclass
class RestContext:
    """What an option's `resolve` may read about its stage, and how it reports.

    `kept`: the most tokens the terms keep; `fewest`: the fewest tokens entering (equal to
    `tokens_in` unless an adaptive stage came before); `adaptive`: a term of this stage has
    a count decided per image; `grid`: the full token grid (rows, cols), None once an
    earlier stage cut it. `report(message, span, expected, code)` records a located error;
    `quantity(q, n)` is the IR's rounding of a quantity of n tokens; `qty_text(q)` how the
    IR quotes one.
    """

    action: Any  # the ast.Keep
    terms: list  # its ResolvedTerms (cls_token left out)
    site: Any  # ResolvedSite
    tokens_in: int
    fewest: int
    kept: int
    adaptive: bool
    grid: tuple[int, int] | None
    report: Callable[..., None]
    quantity: Callable[[Any, int], int]
    qty_text: Callable[[Any], str]

    @property
    def leftover(self) -> int:
        """Tokens surely left over after the terms."""
        return self.fewest - self.kept

    def error(self, message: str, span, *, expected: str | None = None, code: str = "quantity") -> None:
        self.report(message, span, expected=expected, code=code)

    def first_term_scored(self, uses: str, example: str, code: str) -> bool:
        """False (and an error at the first term) when the option needs the first term's
        score and it has none: `uses` says what the option does with the score, `example`
        a stage that works."""
        if self.terms and self.terms[0].score is not None:
            return True
        written = self.action.terms
        first = next((t for t in written if t.kind != "cls_token"), written[0])
        self.error(f"{uses} the first term's score, but the first term ('{first.kind}') has no score", first.span,
                   expected=f"a scored first term, such as '{example}'", code=code)
        return False


@dataclass(frozen=True)
class RestPlan:
    """A resolved option: what the cost model, runtime and listing read."""

    @property
    def tokens(self) -> int:
        """Tokens the option hands on after the kept ones (counted in the stage's output)."""
        raise NotImplementedError

    @property
    def merges(self) -> bool:
        """Whether output tokens are mixes of input tokens (else kept rows are copied as is)."""
        return self.tokens > 0

    @property
    def appends(self) -> bool:
        """LLM stages: whether the option's tokens follow the kept ones in the sequence, in
        the order `run` returns them (else each takes its identity's place)."""
        return False

    @property
    def keys_layer(self) -> int | None:
        """The ViT layer whose attention keys the op reads (the compiler captures them)."""
        return None

    def flops(self, stage, d: int, head_dim: int) -> int:
        """Counted matmul FLOPs per image (docs/dev/contracts.md); d: the tower's width."""
        return 0

    def listing(self) -> str:
        """The resolved option in a listing, e.g. `` then recycle 83 into 9``."""
        raise NotImplementedError

    def run(self, x, kept, scores, view):
        """The runtime op: `x` ``[G, n, d]`` a stage's tokens, `kept` ``[G, k]`` the indices
        the terms chose (sorted), `scores` ``[G, n]`` the first term's scores (None when it
        has none), `view` the compiler's StageView. Returns the output tokens ``[G, k', d]``
        and for each the input index whose identity it takes ``[G, k']``."""
        raise NotImplementedError


class RestOption:
    """One option; subclasses fill the class attributes and methods (see the module doc)."""

    kind: ClassVar[str]  # the AST node's `kind`, and the option's name in the table
    rank: ClassVar[int]  # position in messages (lower first)
    model: ClassVar[type]  # the AST node class
    rule: ClassVar[str]  # its grammar rule (the child of `keep` the parser hands `build`)
    grammar: ClassVar[str]  # Lark rules (the `rule` and its helpers), appended to grammar.lark
    # Keyword terminals only this option uses: name -> (the word, its English in messages).
    # Shared words (then, merge, rest, into, by) are the core grammar's.
    keywords: ClassVar[dict[str, tuple[str, str]]] = {}
    # How `expected:` lines show it among what may follow a keep's terms (None: not shown).
    then_words: ClassVar[str | None] = None
    # Hints for a token found where 'then ...' could start: terminal -> hint.
    hints: ClassVar[dict[str, str]] = {}
    # Its name in "a keep takes one of ..." (older JSON that names two options).
    phrase: ClassVar[str]
    yaml_keys: ClassVar[tuple] = ()  # vtdsl.lang.yaml_keys.YamlKey, in reading order
    # YAML messages when its keys meet another option's: (message, expected), or None for
    # the generic "a keep takes one of ..." line.
    yaml_clash: ClassVar[tuple[str, str] | None] = None
    # YAML: the keys that come in a pair, as "expected" words, when one is missing.
    yaml_together: ClassVar[str | None] = None

    # -- lang -----------------------------------------------------------------------------
    def build(self, b, tree):
        """The AST node from its parse tree; `b` is the parser's builder (`quantity`,
        `grid`, `node`, `span`)."""
        raise NotImplementedError

    def text(self, node) -> str:
        """Canonical `.vt` text, with its leading space: `` then absorb 32``."""
        raise NotImplementedError

    def read_yaml(self, reader, m) -> Any:
        """The node from a YAML stage's keys `m` (name -> (key node, value node)) holding
        one of its keys; `reader` is the YAML reader (`key_value`, `fail`, `node`, `join`)."""
        raise NotImplementedError

    def write_yaml(self, node, item: dict) -> None:
        """Add its keys to a YAML stage item."""
        raise NotImplementedError

    def legacy(self, data: dict) -> dict | None:
        """Pop this option's fields of the JSON AST before `Keep.rest` (vtdsl <= 0.1) from
        a keep's data and return its `rest` data (None: not there)."""
        return None

    # -- ir -------------------------------------------------------------------------------
    def shares(self, node) -> list:
        """Its quantities that are shares of a token count an adaptive stage makes vary
        (refused there as percentages)."""
        return []

    def resolve(self, node, ctx: RestContext) -> RestPlan | None:
        """The resolved option, or None after reporting an error through `ctx`."""
        raise NotImplementedError


_TABLE: dict[str, RestOption] = {}


def register(option: RestOption) -> RestOption:
    """Add an option to the table (a kind is registered once), kept in `rank` order."""
    return add_ranked(_TABLE, option.kind, option, "rest option")


def table() -> dict[str, RestOption]:
    """The registered options by kind, in rank order (what `options()` returns once the
    package has loaded its modules)."""
    return _TABLE
