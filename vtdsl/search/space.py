"""Policy spaces: the policy language with holes.

A space is a `.vt` policy in which some pieces are left open:

    at vit.layer{8..20 step 4} keep anchors top {5%, 10%, 20%} + buffers
    at? llm.layer{2, 3, 4} keep {text top 50% | diverse {32, 64}}

- `{a, b, c}` / `{a | b | c}`: a choice. Items are pieces of policy text (a number, a
  percentage, a word, a whole phrase, a whole stage) and may hold further holes. One choice
  uses one separator; separators inside parentheses (`mean(cls, attn)`) do not count.
- `{lo..hi}` / `{lo..hi step s}`: whole numbers lo, lo+s, ..., up to hi (inclusive); ranges
  may also be items of a list (`{1..4, 8, 16}`).
- `{...}?`: the piece may also be left out (`keep cls top 10% {+ buffers}?`).
- `at? SITE ACTION`: an optional stage.

Holes are substituted as text, so `vit.layer{8..20}` is `vit.layer8` ... and
`top {5..25 step 5}%` is `top 5%` ...; every point of the space is plain `.vt` text that
goes through `vtdsl.lang.parse`, so every candidate is a real policy. Holes are never
recognised inside comments or strings.

The YAML form (`.yaml`/`.yml`) is the policy YAML form with the same holes inside its
values, plus the stage key `at?` for an optional stage.

Each hole is one parameter, named by the `line:column` of its `{` (or of `at?`). A
parameter's value is an int for a hole that is exactly one range, the item's text for
other choices, None for an absent `{...}?` piece, and true/false for `at?`.

Every problem is a located `PolicyError` in the space file: scanner errors (bad range,
unclosed brace, ...) directly, language errors of the instantiated text mapped back to
the exact position of the offending text in the space, with the parser's own `expected`
and `did you mean` lines.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from yaml.nodes import ScalarNode, SequenceNode

from ..lang import ast
from ..lang.errors import Diagnostic, PolicyError
from ..lang.yaml_form import YamlReader, compose_yaml
from ..lang.yaml_keys import RENUMBER, keep_options

MAX_DIAGNOSTICS = 10
MAX_DEPTH = 8  # nested holes
MAX_LIST_VALUES = 10_000  # values of ranges inside a list of several items
MAX_BOUND_DIGITS = 9
MAX_SWEEP_POINTS = 5_000  # parses when validating a space

SPACE_SYNTAXES = ("vt", "yaml")
_EXTENSIONS = {".vts": "vt", ".vt": "vt", ".yaml": "yaml", ".yml": "yaml"}

_RANGE = re.compile(r"^(-?\d+)\s*\.\.\s*(-?\d+)(?:\s+step\s+(\d+))?$")
_IDENT = re.compile(r"[A-Za-z0-9_.]")

Value = Union[int, str, bool, None]
Point = dict[str, Value]


# ---------------------------------------------------------------------------------------
# The template


@dataclass
class Lit:
    """Literal text. `end is None`: character i comes from source offset `start + i`;
    otherwise the text is generated (YAML glue) and stands for source[start:end]."""

    text: str
    start: int
    end: int | None = None


@dataclass
class Range:
    lo: int
    hi: int
    step: int
    start: int  # source offsets of the item
    end: int

    @property
    def count(self) -> int:
        return (self.hi - self.lo) // self.step + 1

    def value(self, k: int) -> int:
        return self.lo + k * self.step

    def __contains__(self, v: int) -> bool:
        return self.lo <= v <= self.hi and (v - self.lo) % self.step == 0

    def text(self) -> str:
        return f"{self.lo}..{self.hi}" + (f" step {self.step}" if self.step != 1 else "")


@dataclass
class Frag:
    """A piece of template: literal text and holes. `label` is its source text (stripped)."""

    parts: list
    label: str = ""
    start: int = 0
    end: int = 0
    count: int = 1

    def holes(self) -> list["Hole"]:
        return [p for p in self.parts if isinstance(p, Hole)]


@dataclass
class Hole:
    name: str  # "line:column"
    kind: str  # "choice" | "stage" (an optional stage) | "flag" (a YAML keyword present or not)
    alts: list  # Frag | Range
    optional: bool
    start: int  # source offsets: '{' (or 'at?') .. after '}' / '?' (or the stage's end)
    end: int
    sep: str = ","
    count: int = 0
    _labels: dict = field(default_factory=dict, repr=False)

    @property
    def boolean(self) -> bool:
        """Whether the parameter's values are true / false (`at?`, `every?`, a YAML flag)."""
        return self.kind in ("stage", "flag")

    @property
    def single_range(self) -> bool:
        return self.kind == "choice" and not self.optional and len(self.alts) == 1 and isinstance(self.alts[0], Range)

    def choices(self) -> list[Value]:
        """Every value of this parameter, in order (lists of ranges expanded)."""
        if self.boolean:
            return [True, False]
        if self.single_range:
            r = self.alts[0]
            return [r.value(k) for k in range(r.count)]
        out: list[Value] = []
        for alt in self.alts:
            if isinstance(alt, Range):
                out += [str(alt.value(k)) for k in range(alt.count)]
            else:
                out.append(alt.label)
        if self.optional:
            out.append(None)
        return out

    def find(self, value: Value):
        """The alternative (Frag or Range) a value selects; None for an absent piece."""
        if self.boolean:
            if value is True:
                return self.alts[0]
            if value is False:
                return None
            raise ValueError(f"parameter {self.name} ({self.kind}) takes true or false, not {value!r}")
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"parameter {self.name} is not optional")
        if isinstance(value, Frag):  # pragma: no cover - defensive
            return value
        if isinstance(value, str) and value in self._labels:
            return self._labels[value]
        if isinstance(value, bool):
            raise ValueError(f"parameter {self.name} does not take {value!r}")
        try:
            number = int(value) if isinstance(value, int) or re.fullmatch(r"-?\d+", str(value)) else None
        except (TypeError, ValueError):  # pragma: no cover
            number = None
        if number is not None and (not self.single_range or isinstance(value, int)):
            for alt in self.alts:
                if isinstance(alt, Range) and number in alt:
                    return alt
        raise ValueError(f"parameter {self.name} has no choice {value!r}")

    def describe(self) -> dict:
        items = []
        for alt in self.alts:
            if isinstance(alt, Range):
                items.append({"range": [alt.lo, alt.hi], "step": alt.step, "count": alt.count})
            else:
                items.append({"text": alt.label, "count": alt.count})
        return {"name": self.name, "kind": {"stage": "optional stage", "flag": "flag"}.get(self.kind) or (
            "range" if self.single_range else "choice"), "optional": self.optional, "count": self.count,
            "items": items}


# ---------------------------------------------------------------------------------------
# Locations


class _Lines:
    """Offsets <-> 1-based (line, column) in one text ("\\n" lines, as the lexer counts)."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]

    def pos(self, offset: int) -> tuple[int, int]:
        import bisect

        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self.starts, offset) - 1
        return line + 1, offset - self.starts[line] + 1

    def offset(self, line: int, column: int) -> int:
        if line < 1:
            return 0
        if line > len(self.starts):
            return len(self.text)
        return self.starts[line - 1] + max(column, 1) - 1

    def span(self, start: int, end: int) -> ast.Span:
        """A span over source[start:end] (end exclusive; an empty range is one column)."""
        l0, c0 = self.pos(start)
        l1, c1 = self.pos(max(end - 1, start))
        return ast.Span(line=l0, column=c0, end_line=l1, end_column=c1)


class _SpaceError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


# ---------------------------------------------------------------------------------------
# Scanning `.vt` text for holes


class _Scanner:
    """Splits text into literals and holes. `base` is the offset of `text` in the source
    (values inside a YAML file); positions in errors are source positions."""

    def __init__(self, text: str, lines: _Lines, base: int = 0, stages: bool = True):
        self.t = text
        self.n = len(text)
        self.i = 0
        self.lines = lines
        self.base = base
        self.stages = stages

    def fail(self, message: str, start: int, end: int | None = None, *, expected: str | None = None,
             hint: str | None = None) -> _SpaceError:
        end = start + 1 if end is None else end
        span = self.lines.span(self.base + start, self.base + end)
        return _SpaceError(Diagnostic(message, span, expected=expected, hint=hint, code="space"))

    def name_at(self, i: int) -> str:
        line, col = self.lines.pos(self.base + i)
        return f"{line}:{col}"

    # -- entry points -------------------------------------------------------------------
    def top(self, diagnostics: list[Diagnostic]) -> list:
        """The whole text; errors are collected (one per line) and scanning goes on."""
        parts: list = []
        while self.i < self.n:
            try:
                parts += self.seq(0, stage=False, open_at=None)
            except _SpaceError as err:
                diagnostics.append(err.diagnostic)
                if len(diagnostics) >= MAX_DIAGNOSTICS:
                    break
                nl = self.t.find("\n", self.i)
                self.i = self.n if nl < 0 else nl + 1
                parts = []  # the template is not used when there are errors
        return parts

    # -- pieces -------------------------------------------------------------------------
    def seq(self, depth: int, stage: bool, open_at: int | None) -> list:
        parts: list = []
        buf: list[str] = []
        buf_start = self.i
        paren = 0

        def flush():
            nonlocal buf, buf_start
            if buf:
                parts.append(Lit("".join(buf), self.base + buf_start))
            buf = []
            buf_start = self.i

        t = self.t
        while self.i < self.n:
            c = t[self.i]
            if depth > 0 and (c == "}" or (c in ",|" and paren == 0)):
                break
            if c == "\n":
                if depth > 0:
                    raise self.unclosed(open_at)
                if stage:
                    break
            if stage and c == ";":
                break
            if c == "#":
                if depth > 0:
                    raise self.fail("a comment cannot start inside '{...}'", self.i,
                                    hint="close the choice with '}' before the comment")
                if stage:
                    break
            if c in '#"':  # a comment or a string is literal text: no holes inside
                end = self._comment_end(self.i) if c == "#" else self._string_end(self.i)
                if not buf:
                    buf_start = self.i
                buf.append(t[self.i:end])
                self.i = end
                continue
            if c == "{":
                flush()
                parts.append(self.hole(depth + 1))
                buf_start = self.i
                continue
            if c == "}":
                raise self.fail("unexpected '}': no choice is open", self.i,
                                hint="a choice is written {a, b, c}; remove the '}' or add the '{'")
            if (self.stages and c in "ae" and (t.startswith("at?", self.i) or t.startswith("every?", self.i))
                    and (self.i == 0 or not _IDENT.match(t[self.i - 1]))):
                flush()
                parts.append(self.stage_hole(depth, open_at, "at" if c == "a" else "every"))
                buf_start = self.i
                continue
            if c == "(":
                paren += 1
            elif c == ")" and paren > 0:
                paren -= 1
            if not buf:
                buf_start = self.i
            buf.append(c)
            self.i += 1
        flush()
        return parts

    def _comment_end(self, i: int) -> int:
        end = self.t.find("\n", i)
        return self.n if end < 0 else end

    def _string_end(self, i: int) -> int:
        """End of a string literal starting at `i` (or of its line when unterminated)."""
        j = i + 1
        while j < self.n and self.t[j] != "\n":
            if self.t[j] == "\\":
                j += 2
                continue
            if self.t[j] == '"':
                return j + 1
            j += 1
        return min(j, self.n)

    def unclosed(self, open_at: int | None) -> _SpaceError:
        return self.fail("unclosed '{'", open_at if open_at is not None else self.i,
                         expected="'}' on the same line, closing the choice opened here",
                         hint="a choice is written {a, b, c} on one line")

    def stage_hole(self, depth: int, open_at: int | None, keyword: str = "at") -> Hole:
        """An optional stage: `at? SITE ACTION` or `every? ... ACTION` (a schedule)."""
        start = self.i
        self.i += len(keyword) + 1  # "at?" / "every?"
        rest = self.seq(depth, stage=True, open_at=open_at)
        parts = [Lit(keyword, self.base + start)] + rest
        parts = _strip(parts)
        end = self.i
        label = self.t[start:end].strip()
        alt = Frag(parts, label, self.base + start, self.base + end)
        return Hole(self.name_at(start), "stage", [alt], True, self.base + start, self.base + end)

    def hole(self, depth: int) -> Hole:
        start = self.i
        if depth > MAX_DEPTH:
            raise self.fail(f"choices nest too deeply (more than {MAX_DEPTH} levels)", start)
        self.i += 1
        raw: list[tuple[list, int, int]] = []
        seps: list[tuple[str, int]] = []
        while True:
            alt_start = self.i
            parts = self.seq(depth, stage=False, open_at=start)
            if self.i >= self.n:
                raise self.unclosed(start)
            raw.append((parts, alt_start, self.i))
            c = self.t[self.i]
            if c == "}":
                self.i += 1
                break
            seps.append((c, self.i))
            self.i += 1
        kinds = {c for c, _ in seps}
        if len(kinds) > 1:
            first = seps[0][0]
            other = next(pos for c, pos in seps if c != first)
            raise self.fail("a choice separates its items with ',' or with '|', not both", other,
                            hint=f"use '{first}' throughout this choice")
        optional = self.i < self.n and self.t[self.i] == "?"
        if optional:
            self.i += 1
        alts = [self.alternative(parts, a, b, start) for parts, a, b in raw]
        hole = Hole(self.name_at(start), "choice", alts, optional, self.base + start, self.base + self.i,
                    sep=seps[0][0] if seps else ",")
        self.index_labels(hole, raw)
        return hole

    def alternative(self, parts: list, a: int, b: int, open_at: int):
        text = self.t[a:b]
        stripped = text.strip()
        if not stripped:
            where = a if a < b else max(a - 1, open_at)
            raise self.fail("empty item in a choice", where,
                            expected="a value or a piece of policy text between the separators",
                            hint="to make a piece optional, write {...}? instead of an empty item")
        lead = len(text) - len(text.lstrip())
        s, e = a + lead, a + lead + len(stripped)
        # a number range ({8..20}); a layer-range score (cls@vit.layer8..22 sum) is text
        if re.match(r"^-?\d*\s*\.\.", stripped) and not any(isinstance(p, Hole) for p in parts):
            return self.range(stripped, s, e)
        frag = Frag(_strip(parts), stripped, self.base + s, self.base + e)
        return frag

    def range(self, text: str, s: int, e: int) -> Range:
        m = _RANGE.match(text)
        if not m:
            hint = None
            mm = re.match(r"^(-?\d+)\s*\.\.\s*(-?\d+)\s*:\s*(\d+)$", text)
            if mm:
                hint = f"write the step as '{mm.group(1)}..{mm.group(2)} step {mm.group(3)}'"
            elif re.match(r"^-?\d*\s*\.\.\s*-?\d*$", text) and (text.startswith("..") or text.endswith("..")):
                hint = "a range needs both bounds, as in 8..20"
            elif re.search(r"\d+\.\d|%", text):
                hint = "range bounds are whole numbers; for percentages write {5..25 step 5}%"
            elif re.search(r"\bstep\b", text):
                hint = "the step is a whole number of at least 1, as in 8..20 step 4"
            raise self.fail(f"bad range '{_show(text)}'", s, e,
                            expected="a range of whole numbers: LO..HI or LO..HI step S", hint=hint)
        lo_t, hi_t, step_t = m.group(1), m.group(2), m.group(3)
        for part in (lo_t, hi_t, step_t or "1"):
            if len(part.lstrip("-").lstrip("0")) > MAX_BOUND_DIGITS:
                raise self.fail(f"bad range '{_show(text)}': the numbers are too large", s, e,
                                hint=f"range bounds have at most {MAX_BOUND_DIGITS} digits")
        lo, hi, step = int(lo_t), int(hi_t), int(step_t or 1)
        if step < 1:
            raise self.fail(f"bad range '{_show(text)}': the step must be at least 1", s, e)
        if lo > hi:
            raise self.fail(f"bad range '{_show(text)}': it is empty ({lo} > {hi})", s, e,
                            hint=f"write the smaller bound first: {hi}..{lo}")
        return Range(lo, hi, step, self.base + s, self.base + e)

    def index_labels(self, hole: Hole, raw) -> None:
        """Labels of every value; duplicates are an error (each point is distinct)."""
        seen: dict[str, int] = {}
        several = len(hole.alts) > 1 or hole.optional
        total = 0
        for alt in hole.alts:
            if isinstance(alt, Range):
                total += alt.count
                if several and total > MAX_LIST_VALUES:
                    raise self.fail(f"too many values in this choice (more than {MAX_LIST_VALUES})",
                                    alt.start - self.base, alt.end - self.base,
                                    hint="a range alone in its braces ({lo..hi}) may be of any size")
                labels = [str(alt.value(k)) for k in range(alt.count)] if several else []
                where = alt.start
            else:
                labels = [alt.label]
                where = alt.start
                hole._labels[alt.label] = alt
            for label in labels:
                if label in seen:
                    line, col = self.lines.pos(seen[label])
                    raise self.fail(f"duplicate choice '{_show(label)}' (also at {line}:{col})",
                                    where - self.base, (alt.end - self.base),
                                    hint="each item of a choice must be different")
                seen[label] = where


def _strip(parts: list) -> list:
    """Drop leading and trailing whitespace of a fragment (exact offsets kept)."""
    parts = list(parts)
    if parts and isinstance(parts[0], Lit) and parts[0].end is None:
        lit = parts[0]
        stripped = lit.text.lstrip()
        parts[0] = Lit(stripped, lit.start + len(lit.text) - len(stripped))
        if not stripped:
            parts.pop(0)
    if parts and isinstance(parts[-1], Lit) and parts[-1].end is None:
        lit = parts[-1]
        stripped = lit.text.rstrip()
        parts[-1] = Lit(stripped, lit.start)
        if not stripped:
            parts.pop()
    return parts


def _show(text: str, limit: int = 40) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count_frag(frag: Frag) -> int:
    n = 1
    for h in frag.holes():
        n *= _count_hole(h)
    frag.count = n
    return n


def _count_hole(h: Hole) -> int:
    n = 0
    for alt in h.alts:
        n += alt.count if isinstance(alt, Range) else _count_frag(alt)
    n += 1 if h.optional else 0
    h.count = n
    return n


def _all_holes(parts: list) -> Iterator[Hole]:
    for p in parts:
        if isinstance(p, Hole):
            yield p
            for alt in p.alts:
                if isinstance(alt, Frag):
                    yield from _all_holes(alt.parts)


# ---------------------------------------------------------------------------------------
# Rendering a point


@dataclass
class Rendered:
    """Instantiated `.vt` text and, per character, the source range it came from."""

    text: str
    lo: list[int]
    hi: list[int]


class _Out:
    def __init__(self):
        self.chunks: list[str] = []
        self.lo: list[int] = []
        self.hi: list[int] = []

    def exact(self, text: str, start: int) -> None:
        self.chunks.append(text)
        r = range(start, start + len(text))
        self.lo.extend(r)
        self.hi.extend(r)

    def fixed(self, text: str, start: int, end: int) -> None:
        self.chunks.append(text)
        self.lo.extend([start] * len(text))
        self.hi.extend([max(end - 1, start)] * len(text))

    def done(self) -> Rendered:
        return Rendered("".join(self.chunks), self.lo, self.hi)


def _render(parts: list, point: Point, out: _Out) -> None:
    for p in parts:
        if isinstance(p, Lit):
            if p.end is None:
                out.exact(p.text, p.start)
            else:
                out.fixed(p.text, p.start, p.end)
            continue
        if p.name not in point:
            raise ValueError(f"no value for parameter {p.name}")
        alt = p.find(point[p.name])
        if alt is None:
            continue
        if isinstance(alt, Range):
            out.fixed(str(int(point[p.name])), alt.start, alt.end)
        else:
            _render(alt.parts, point, out)


# ---------------------------------------------------------------------------------------
# Points: decoding an index, walking for optuna, sweeping for validation


def _decode_frag(frag_parts: list, idx: int, out: Point) -> None:
    for h in reversed([p for p in frag_parts if isinstance(p, Hole)]):
        idx, r = divmod(idx, h.count)
        _decode_hole(h, r, out)


def _decode_hole(h: Hole, r: int, out: Point) -> None:
    for alt in h.alts:
        c = alt.count
        if r < c:
            if isinstance(alt, Range):
                v = alt.value(r)
                out[h.name] = v if h.single_range else str(v)
            else:
                out[h.name] = True if h.boolean else alt.label
                _decode_frag(alt.parts, r, out)
            return
        r -= c
    out[h.name] = False if h.boolean else None


def _encode_frag(frag_parts: list, point: Point) -> int:
    idx = 0
    for h in [p for p in frag_parts if isinstance(p, Hole)]:
        idx = idx * h.count + _encode_hole(h, point)
    return idx


def _encode_hole(h: Hole, point: Point) -> int:
    value = point[h.name]
    alt = h.find(value)
    base = 0
    for a in h.alts:
        if a is alt:
            if isinstance(a, Range):
                return base + (int(value) - a.lo) // a.step
            return base + _encode_frag(a.parts, point)
        base += a.count
    return base  # absent


def _first_point(h: Hole) -> Point:
    out: Point = {}
    _decode_hole(h, 0, out)
    return out


def _names(h: Hole) -> set[str]:
    return {h.name} | {x.name for alt in h.alts if isinstance(alt, Frag) for x in _all_holes(alt.parts)}


def _sweep_frag(parts: list) -> list[Point]:
    """Points in which every item of every hole appears at least once (ranges: both
    ends), the others at their first item."""
    holes = [p for p in parts if isinstance(p, Hole)]
    base: Point = {}
    for h in holes:
        base.update(_first_point(h))
    points = [base]
    for h in holes:
        names = _names(h)
        rest = {k: v for k, v in base.items() if k not in names}
        points += [{**rest, **pt} for pt in _sweep_hole(h)]
    return points


def _sweep_hole(h: Hole) -> list[Point]:
    out: list[Point] = []
    for alt in h.alts:
        if isinstance(alt, Range):
            for v in dict.fromkeys((alt.lo, alt.value(alt.count - 1))):
                out.append({h.name: v if h.single_range else str(v)})
        else:
            label = True if h.boolean else alt.label
            out += [{h.name: label, **pt} for pt in _sweep_frag(alt.parts)]
    if h.optional:
        out.append({h.name: False if h.boolean else None})
    return out


# ---------------------------------------------------------------------------------------
# The space


@dataclass
class Candidate:
    """One point of a space as a policy."""

    point: Point
    rendered: Rendered
    policy: ast.Policy
    text: str  # canonical `.vt` text (vtdsl fmt)


class Space:
    """A parsed policy space. Build with `parse_space` / `load_space`."""

    def __init__(self, source: str, filename: str, syntax: str, root: Frag):
        self.source = source
        self.filename = filename
        self.syntax = syntax
        self.root = root
        self.lines = _Lines(source)
        self.holes: list[Hole] = list(_all_holes(root.parts))
        self._by_name = {h.name: h for h in self.holes}
        _count_frag(root)

    # -- size and points ----------------------------------------------------------------
    @property
    def count(self) -> int:
        """The number of points (distinct parameter assignments) of the space."""
        return self.root.count

    def hole(self, name: str) -> Hole:
        return self._by_name[name]

    def point(self, index: int) -> Point:
        """The point number `index` (0 <= index < count); the last hole varies fastest."""
        if not 0 <= index < self.count:
            raise IndexError(f"point {index} is outside the space (0..{self.count - 1})")
        out: Point = {}
        _decode_frag(self.root.parts, index, out)
        return self._ordered(out)

    def index(self, point: Point) -> int:
        """Inverse of `point`."""
        return _encode_frag(self.root.parts, point)

    def points(self) -> Iterator[Point]:
        for i in range(self.count):
            yield self.point(i)

    def sample(self, n: int, seed: int | None = 0) -> list[tuple[int, Point]]:
        """`n` distinct points drawn uniformly (all of them, shuffled, when n >= count)."""
        rng = random.Random(seed)
        n = min(n, self.count)
        if self.count <= 1 << 62:
            indices = rng.sample(range(self.count), n)
        else:
            seen: dict[int, None] = {}
            while len(seen) < n:
                seen[rng.randrange(self.count)] = None
            indices = list(seen)
        return [(i, self.point(i)) for i in indices]

    def _ordered(self, point: Point) -> Point:
        return {h.name: point[h.name] for h in self.holes if h.name in point}

    def suggest(self, trial) -> Point:
        """Ask an optuna trial for a point (define-by-run: nested holes only when used)."""
        out: Point = {}

        def walk(parts):
            for h in parts:
                if not isinstance(h, Hole):
                    continue
                if h.single_range:
                    r = h.alts[0]
                    v = trial.suggest_int(h.name, r.lo, r.value(r.count - 1), step=r.step)
                else:
                    v = trial.suggest_categorical(h.name, h.choices())
                out[h.name] = v
                alt = h.find(v)
                if isinstance(alt, Frag):
                    walk(alt.parts)

        walk(self.root.parts)
        return self._ordered(out)

    def describe(self) -> list[dict]:
        return [h.describe() for h in self.holes]

    # -- instantiation ------------------------------------------------------------------
    def render(self, point: Point) -> Rendered:
        out = _Out()
        _render(self.root.parts, point, out)
        return out.done()

    def candidate(self, point: Point) -> Candidate:
        """The point as a parsed policy; a PolicyError located in the space otherwise."""
        from ..lang import format_policy, parse

        rendered = self.render(point)
        try:
            policy = parse(rendered.text, self.filename)
        except PolicyError as err:
            raise self.remap(err, rendered) from None
        return Candidate(point, rendered, policy, format_policy(policy))

    def remap(self, err: PolicyError, rendered: Rendered) -> PolicyError:
        """The same diagnostics, located in the space source instead of the rendered text."""
        return PolicyError([self.remap_diagnostic(d, rendered) for d in err.diagnostics],
                           source=self.source, filename=self.filename)

    def remap_diagnostic(self, d: Diagnostic, rendered: Rendered) -> Diagnostic:
        if d.span is None:
            return Diagnostic(d.message, None, d.severity, d.expected, d.hint, d.code)
        rl = _Lines(rendered.text)
        n = len(rendered.text)
        a = rl.offset(d.span.line, d.span.column)
        b = rl.offset(d.span.end_line, d.span.end_column)
        b = max(a, b)

        def lo(i):
            if i < n:
                return rendered.lo[i]
            return (rendered.hi[-1] + 1) if n else 0

        def hi(i):
            if i < n:
                return rendered.hi[i]
            return (rendered.hi[-1] + 1) if n else 0

        s = lo(a)
        e = max(hi(b), s)
        if a >= n or (a == b and d.span.end_column < d.span.column):  # an empty span: end of input
            e = s
        span = self.lines.span(s, e + 1)
        return Diagnostic(d.message, span, d.severity, d.expected, d.hint, d.code)

    def where(self, err: PolicyError, rendered: Rendered) -> str:
        """One line for a trial's reason: `file:line:col: message`."""
        d = self.remap_diagnostic(err.diagnostics[0], rendered) if err.diagnostics else None
        if d is None:
            return str(err)
        if d.span is None:
            return f"{self.filename}: {d.message}"
        return f"{self.filename}:{d.span.line}:{d.span.column}: {d.message}"

    # -- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        """Parse the points of a sweep (every item of every hole at least once) and report
        language errors at their place in the space; also refuse items of one hole that
        give the same policy."""
        from ..lang import format_policy, parse

        diagnostics: list[Diagnostic] = []
        seen_errors: set = set()
        points = {json.dumps(p, sort_keys=True): p for p in _sweep_frag(self.root.parts)}
        canon: dict[str, Point] = {}
        for point in list(points.values())[:MAX_SWEEP_POINTS]:
            rendered = self.render(point)
            try:
                policy = parse(rendered.text, self.filename)
            except PolicyError as err:
                for d in err.diagnostics:
                    md = self.remap_diagnostic(d, rendered)
                    key = (md.span.line, md.span.column) if md.span else (0, md.message)
                    if key not in seen_errors:
                        seen_errors.add(key)
                        diagnostics.append(md)
                continue
            text = format_policy(policy)
            other = canon.setdefault(text, point)
            if other is not point:
                d = self._same_policy(other, point)
                key = (d.span.line, d.span.column, "same") if d.span else (0, 0, "same")
                if key not in seen_errors:
                    seen_errors.add(key)
                    diagnostics.append(d)
        if diagnostics:
            diagnostics.sort(key=lambda d: (d.span.line, d.span.column) if d.span else (0, 0))
            raise PolicyError(diagnostics[:MAX_DIAGNOSTICS], source=self.source, filename=self.filename)

    def _same_policy(self, a: Point, b: Point) -> Diagnostic:
        for h in self.holes:
            if a.get(h.name, _MISSING) != b.get(h.name, _MISSING):
                va, vb = a.get(h.name), b.get(h.name)
                span = self.lines.span(h.start, h.end)
                return Diagnostic(
                    f"items {_label(va)} and {_label(vb)} of this choice give the same policy",
                    span, hint="each point of a space must be a different policy; remove one of them",
                    code="space")
        return Diagnostic("two points of the space give the same policy", None, code="space")  # pragma: no cover

    # -- headers ------------------------------------------------------------------------
    def base_policy(self) -> ast.Policy:
        """The first point as a policy (its header lines: name, model, budgets)."""
        return self.candidate(self.point(0)).policy


_MISSING = object()


def _label(v: Value) -> str:
    if v is None:
        return "(absent)"
    if isinstance(v, bool):
        return "(present)" if v else "(absent)"
    return f"'{_show(str(v))}'"


# ---------------------------------------------------------------------------------------
# Reading spaces


def syntax_of(filename: str) -> str:
    ext = Path(filename).suffix.lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    raise PolicyError(
        Diagnostic(f"cannot tell the space syntax of '{filename}' from its extension", None,
                   expected="a file ending in .vts (or .vt), .yaml or .yml",
                   hint="name the file *.vts or *.yaml (the CLI also takes --from vt|yaml)", code="input"),
        filename=filename)


def parse_space(text: str, filename: str = "<space>", syntax: str = "vt", validate: bool = True) -> Space:
    """A `Space` from its source text; `PolicyError` (located) for any problem."""
    from ..lang.parser import check_size

    if not isinstance(text, str):
        raise TypeError(f"parse_space() takes text (str), not {type(text).__name__}")
    check_size(text, filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    if syntax == "yaml":
        root = _yaml_template(text, filename)
    elif syntax == "vt":
        lines = _Lines(text)
        diagnostics: list[Diagnostic] = []
        parts = _Scanner(text, lines).top(diagnostics)
        if diagnostics:
            raise PolicyError(diagnostics[:MAX_DIAGNOSTICS], source=text, filename=filename)
        root = Frag(parts, text.strip(), 0, len(text))
    else:
        raise ValueError(f"unknown space syntax {syntax!r}; expected one of {SPACE_SYNTAXES}")
    space = Space(text, filename, syntax, root)
    if validate:
        space.validate()
    return space


def load_space(path: str | os.PathLike, syntax: str | None = None) -> Space:
    """Read and check a space file (`.vts`/`.vt`, `.yaml`/`.yml`, or `syntax`)."""
    from ..lang.source import decode, read_bytes

    filename = str(path)
    syntax = syntax or syntax_of(filename)
    data = read_bytes(path)
    return parse_space(decode(data, filename), filename, syntax)


# ---------------------------------------------------------------------------------------
# The YAML form



class _SpaceReader(YamlReader):
    """The YAML form with holes: each statement becomes `.vt` text, the words a key stands
    for glued at that key and each value scanned for holes; `at?:` / `every?:` make the
    whole stage an optional-stage hole, `renumber: "{true, false}"` a flag."""

    document = "a YAML space"
    noun = "spaces"
    variants = {"at": ("at", "at?"), "every": ("every", "every?")}
    site_note = " (or 'at?: <site>' for an optional stage)"
    error_type = _SpaceError
    max_diagnostics = MAX_DIAGNOSTICS

    def __init__(self, text: str, filename: str):
        super().__init__(text, filename)
        self.lines = _Lines(text)

    def span(self, node) -> ast.Span:
        start = node.start_mark.index
        return self.lines.span(start, max(node.end_mark.index, start + 1))

    def show(self, name: str) -> str:
        return _show(name)

    def glue(self, s: str, node) -> Lit:
        """Generated text that stands for `node` in the source."""
        return Lit(s, node.start_mark.index, max(node.end_mark.index, node.start_mark.index + 1))

    def value(self, node, what: str) -> list:
        v = self.scalar(node, what).value
        if "\n" in v:
            raise self.fail(f"{what} must be one line", node)
        base = node.start_mark.index + (1 if node.style in ("'", '"') else 0)
        if self.text[base:base + len(v)] != v and "{" not in v:  # escapes or folding: map it to its node
            return [self.glue(v, node)]
        errs: list[Diagnostic] = []
        parts = _Scanner(v, self.lines, base=base, stages=False).top(errs)
        if errs:
            raise _SpaceError(errs[0])
        return parts

    # -- the pieces ---------------------------------------------------------------------
    def header(self, key: str, node) -> list:
        return [self.glue(f"{key} {json.dumps(self.header_text(node, key))}", node)]

    def budget(self, node) -> list:
        return [self.glue("budget ", node)] + self.value(node, "a budget")

    def stage(self, node) -> list:
        m = self.stage_mapping(node)
        schedule = self.placement(m, node)
        action = self.action(m, node)
        for option in keep_options():
            self.together(m, option)
        parts, at_key = self.schedule_text(m) if schedule else self.site_text(m)
        parts += self.action_text(m, action) + self.options_text(m) + self.renumber_text(m)
        if "at?" in m or "every?" in m:
            start = at_key.start_mark.index
            end = max(n.end_mark.index for _, n in m.values())
            line, col = self.lines.pos(start)
            alt = Frag(parts, self.text[start:end].strip(), start, end)
            return [Hole(f"{line}:{col}", "stage", [alt], True, start, end)]
        return parts

    def site_text(self, m) -> tuple[list, object]:
        name = "at?" if "at?" in m else "at"
        at_key, at_val = m[name]
        return [self.glue("at ", at_key)] + self.value(at_val, f"'{name}'") + [self.glue(" ", at_key)], at_key

    def schedule_text(self, m) -> tuple[list, object]:
        every_key = "every?" if "every?" in m else "every" if "every" in m else None
        at_key = m[every_key][0] if every_key else m["from"][0]
        parts = [self.glue("every ", at_key)]
        if every_key and not self.is_null(m[every_key][1]):
            parts += self.value(m[every_key][1], f"'{every_key}'") + [self.glue(" layers", m[every_key][0])]
        else:  # `every?:` with no value: an optional schedule over every layer
            parts.append(self.glue("layer", at_key))
        parts += [self.glue(" from ", m["from"][0])] + self.value(m["from"][1], "'from'")
        parts += [self.glue(" to ", m["to"][0])] + self.value(m["to"][1], "'to'") + [self.glue(" ", m["to"][0])]
        return parts, at_key

    def action_text(self, m, action: str) -> list:
        key, val = m[action]
        parts = [self.glue(action + " ", key)]
        if action != "keep" or not isinstance(val, SequenceNode):
            return parts + self.value(val, f"'{action}'")
        for i, item in enumerate(self.keep_items(val)):
            if i:
                parts.append(self.glue(" + ", item))
            parts += self.value(item, "a term")
        return parts

    def options_text(self, m) -> list:
        """The keep options' keys, each as the `.vt` words of the key table around its value."""
        parts: list = []
        for option in keep_options():
            for k in option.keys:
                if k.name in m:
                    key, val = m[k.name]
                    parts += [self.glue(k.phrase, key)] + self.value(val, k.what)
                    if k.after:
                        parts.append(self.glue(k.after, key))
        return parts

    def renumber_text(self, m) -> list:
        if RENUMBER not in m:
            return []
        key, val = m[RENUMBER]
        word = val.value if isinstance(val, ScalarNode) else None
        if word in ("true", "false"):
            return [self.glue(" renumber", key)] if word == "true" else []
        if isinstance(val, ScalarNode) and _FLAG_CHOICE.fullmatch(val.value):
            start, end = key.start_mark.index, val.end_mark.index
            line, col = self.lines.pos(val.start_mark.index + (1 if val.style in ("'", '"') else 0))
            alt = Frag([self.glue(" renumber", key)], "renumber", start, end)
            return [Hole(f"{line}:{col}", "flag", [alt], True, start, end)]
        raise self.fail("'renumber' takes true, false or the choice \"{true, false}\"", val)

    # -- the document -------------------------------------------------------------------
    def empty(self) -> Frag:
        return Frag([], self.text.strip(), 0, len(self.text))

    def finish(self, root, top, headers: dict, budgets: list, stages: list) -> Frag:
        parts: list = []
        for i, statement in enumerate(list(headers.values()) + budgets + stages):
            if i:
                parts.append(Lit("\n", len(self.text), len(self.text)))
            parts += statement
        return Frag(parts, self.text.strip(), 0, len(self.text))


_FLAG_CHOICE = re.compile(r"\{\s*(true\s*,\s*false|false\s*,\s*true)\s*\}")


def _brace_hint(text: str, exc) -> str | None:
    """A YAML syntax error on a line with '{': most likely an unquoted choice."""
    mark = exc.problem_mark or exc.context_mark
    line_text = text.split("\n")[mark.line] if mark is not None and mark.line < text.count("\n") + 1 else ""
    if "{" in line_text:
        return "quote a value that starts with '{' or holds ': ' (\"{cls, attn} top 10%\")"
    return None


def _yaml_template(text: str, filename: str) -> Frag:
    root = compose_yaml(text, filename, hint=lambda exc: _brace_hint(text, exc))
    return _SpaceReader(text, filename).read(root)
