"""The `.vt` front end: source text -> typed AST, or a located `PolicyError`.

How a file is read:

1. The whole text is lexed once with the grammar's basic lexer (keywords are retyped NAMEs,
   so they never break identifiers). Comments are kept aside for the formatter.
2. The token stream is split at `;` and newlines; each statement is parsed on its own from
   the grammar's `statement` rule with Lark's interactive LALR parser, token by token. That
   loop is where scorer names and sites are checked (so `divers` is reported where it is
   written, with "did you mean 'diverse'?") and where nesting depth is bounded.
3. Each statement's tree is built into AST nodes; pydantic validators run there and their
   complaints become located errors.

Every statement reports at most one error and parsing goes on with the next one, so a
file with three mistakes gets three messages (up to `MAX_DIAGNOSTICS`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lark import Lark, Token, Tree
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedToken
from lark.lexer import LexerThread
from pydantic import ValidationError

from ..ops import rest as rest_options
from . import ast
from .errors import Diagnostic, PolicyError, did_you_mean
from .scorers import COMBINERS, MAX_SCORE_DEPTH, SCORERS, SELECTORS
from .terminals import END_OF_STATEMENT, TERMINAL_WORDS, add_rest_words, expected_phrase, keyword_of

# `cls(whole)`: the CLS row of one head as wide as the layer (q·k over all the heads' channels,
# scale 1/sqrt(width)), as PruMerge and Recoverable Compression read CLIP's last layer
WHOLE_HEAD = "whole"

GRAMMAR_PATH = Path(__file__).with_name("grammar.lark")
# Entry rules: `statement` for .vt files, the others for values inside the YAML form.
START_RULES = ["start", "statement", "term", "terms", "quantity", "budget_body", "site", "region_body", "grid",
               "decode_count", "merge_body"]

MAX_SOURCE_BYTES = 1 << 20  # 1 MiB: policies are a few lines; anything bigger is a mistake
MAX_DIAGNOSTICS = 10
MAX_NUMBER_DIGITS = 30  # digits before the decimal point; far beyond any meaningful value
MAX_SEED = 2**63 - 1

_SEPARATORS = ("_NL", "_SEMI")
_HEADERS = {"policy_line": "policy", "model_line": "model", "budget_line": "budget"}


@functools.lru_cache(maxsize=None)
def grammar() -> Lark:
    return Lark(
        GRAMMAR_PATH.read_text(encoding="utf-8") + _rest_grammar(),
        parser="lalr",
        lexer="basic",
        propagate_positions=True,
        start=START_RULES,
    )


@functools.lru_cache(maxsize=None)
def _keeping_lexer():
    """`grammar()`'s lexer that also hands on the %ignore'd tokens (whitespace, comments).
    `Lark.lex(dont_ignore=True)` builds a new one, scanner regexes included, on every call:
    most of the time a compile spends parsing a short policy."""
    return grammar()._build_lexer(dont_ignore=True)


def lex_all(text: str):
    """Every token of `text`, the ignored ones too (no postlexer: the grammar has none)."""
    return LexerThread.from_text(_keeping_lexer(), text).lex(None)


def _rest_grammar() -> str:
    """The `rest` rule of grammar.lark's `keep`: one alternative per registered option,
    with the option's rules and keywords (their English words go to TERMINAL_WORDS)."""
    options = list(rest_options.options().values())
    add_rest_words(options)
    keywords = {name: word for o in options for name, (word, _) in o.keywords.items()}
    return ("\n// ---- what happens to the rest (vtdsl/ops/rest/, one module per option) ----\n"
            + "?rest: " + " | ".join(o.rule for o in options) + "\n"
            + "".join(o.grammar for o in options)
            + "".join(f'{name}: "{word}"\n' for name, word in keywords.items()))


# ---------------------------------------------------------------------------------------
# Locations


@dataclass
class _Where:
    """Maps positions in the text being parsed to positions in the user's file.

    For a `.vt` file the two are the same; for a value inside a YAML file the text starts at
    (line, column) of the file, so positions on its first line are shifted.
    """

    filename: str = "<policy>"
    source: str | None = None
    line: int = 1
    column: int = 1
    end_words: str = END_OF_STATEMENT  # what "$END" means here, in messages

    def pos(self, line: int, column: int) -> tuple[int, int]:
        if line == 1:
            return self.line, column + self.column - 1
        return line + self.line - 1, column

    def span(self, line: int, column: int, end_line: int, end_column: int) -> ast.Span:
        """`end_column` is exclusive, as Lark reports it."""
        l0, c0 = self.pos(line, column)
        l1, c1 = self.pos(end_line, end_column)
        return ast.Span(line=l0, column=c0, end_line=l1, end_column=max(c1 - 1, 0))

    def of_token(self, tok: Token) -> ast.Span:
        return self.span(tok.line, tok.column, tok.end_line, tok.end_column)

    def of_tree(self, tree: Tree) -> ast.Span:
        m = tree.meta
        return self.span(m.line, m.column, m.end_line, m.end_column)

    def after(self, tok: Token) -> ast.Span:
        """The (empty) position just after a token: where "end of input" is reported."""
        return self.span(tok.end_line, tok.end_column, tok.end_line, tok.end_column)


class _StatementError(Exception):
    def __init__(self, diagnostic: Diagnostic):
        self.diagnostic = diagnostic


def _fail(message: str, span: ast.Span | None, *, expected: str | None = None, hint: str | None = None,
          code: str = "syntax") -> _StatementError:
    return _StatementError(Diagnostic(message, span, expected=expected, hint=hint, code=code))


# ---------------------------------------------------------------------------------------
# Words shown in messages


def show(text: str, limit: int = 40) -> str:
    """A token's text for a message: quoted, shortened, without invisible characters."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_char(ch: str) -> str:
    if ch.isprintable() and ord(ch) < 128:
        return f"'{ch}'"
    name = unicodedata.name(ch, "control character" if not ch.isprintable() else "character")
    shown = f"'{ch}' " if ch.isprintable() and not ch.isspace() else ""
    return f"{shown}U+{ord(ch):04X} ({name})"


# how an error names a token of each value-carrying terminal ({} is the shortened text)
_TOKEN_WORDS = {"NAME": "word '{}'", "SITE": "site '{}'", "NUMBER": "number {}", "PERCENT": "percentage {}",
                "GRID": "grid size {}", "STRING": "string {}"}


def describe_token(tok: Token) -> str:
    t, v = tok.type, str(tok)
    if t in _TOKEN_WORDS:
        return _TOKEN_WORDS[t].format(show(v))
    if keyword_of(t):
        return f"keyword '{v}'"
    return f"'{show(v)}'"


_SITE_RE = re.compile(r"^(vit|llm)\.layer(-?[0-9]+)$|^vit\.out$")
_RANGE_RE = re.compile(r"^(vit|llm)\.layer(-?[0-9]+)\.\.(-?[0-9]+)$")


def site_candidates(word: str) -> list[str]:
    m = re.search(r"-?[0-9]+$", word)
    out = ["vit.out"]
    if m:
        out += [f"vit.layer{m.group()}", f"llm.layer{m.group()}"]
    return out


def site_hint(word: str) -> str | None:
    if word == "llm.out":
        return "the LLM has no 'out' site; LLM stages act at llm.layerN"
    if re.fullmatch(r"(vit|llm)\.layer", word):
        return f"add a layer number, as in {word}16"
    return did_you_mean(word[:64], site_candidates(word))


# ---------------------------------------------------------------------------------------
# Parsing


@dataclass
class StatementInfo:
    """Where one statement sits in the source; the formatter re-attaches comments by it."""

    kind: str  # "policy" | "model" | "budget" | "stage" | "decode"
    index: int  # position in Policy.budgets / Policy.stages (0 for policy / model)
    line: int
    end_line: int


@dataclass
class Parsed:
    policy: ast.Policy
    source: str
    statements: list[StatementInfo] = field(default_factory=list)
    comments: list[Token] = field(default_factory=list)


def check_size(text: str | bytes, filename: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
    if size > MAX_SOURCE_BYTES:
        raise PolicyError(
            Diagnostic(
                f"policy source is too large ({size} bytes; the limit is {MAX_SOURCE_BYTES // 1024} KiB)",
                None,
                hint="a policy is a few lines; is this the right file?",
                code="input",
            ),
            filename=filename,
        )


def parse(text: str, filename: str = "<policy>") -> ast.Policy:
    """Parse `.vt` source text into a `Policy`; raises `PolicyError` on any bad input."""
    return parse_source(text, filename).policy


def parse_source(text: str, filename: str = "<policy>") -> Parsed:
    if not isinstance(text, str):
        raise TypeError(f"parse() takes text (str), not {type(text).__name__}")
    check_size(text, filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    where = _Where(filename, text)
    diagnostics: list[Diagnostic] = []
    comments: list[Token] = []
    built: list[tuple[str, Any, ast.Span]] = []

    def run(tokens: list[Token], terminator: Token | None) -> None:
        if not tokens:
            return
        try:
            tree = _parse_tokens(tokens, "statement", where, terminator)
            built.append(_Builder(where).statement(tree))
        except _StatementError as err:
            diagnostics.append(err.diagnostic)
        except LarkError:  # defensive: no other parser complaint is known to reach here
            diagnostics.append(Diagnostic("cannot parse this statement", where.of_token(tokens[0]), code="syntax"))

    current: list[Token] = []
    try:
        for tok in lex_all(text):
            if tok.type == "WS":
                continue
            if tok.type == "COMMENT":
                comments.append(tok)
            elif tok.type in _SEPARATORS:
                run(current, tok)
                current = []
            else:
                current.append(tok)
            if len(diagnostics) >= MAX_DIAGNOSTICS:
                break
        else:
            run(current, None)
    except UnexpectedCharacters as exc:
        diagnostics.append(_lex_error(exc, text, current, where))

    if not diagnostics:
        policy, statements = _assemble(built, diagnostics)
    if diagnostics:
        diagnostics.sort(key=lambda d: (d.span.line, d.span.column) if d.span else (0, 0))
        raise PolicyError(diagnostics[:MAX_DIAGNOSTICS], source=text, filename=filename)
    return Parsed(policy, text, statements, comments)


def _assemble(built, diagnostics: list[Diagnostic]):
    name = model = model_span = None
    first: dict[str, int] = {}
    budgets: list[ast.Budget] = []
    stages: list[ast.Stage] = []
    decode: list[ast.DecodeSelect] = []
    statements: list[StatementInfo] = []
    for kind, value, span in built:
        if kind in ("policy", "model"):
            if kind in first:
                diagnostics.append(Diagnostic(
                    f"a second '{kind}' line (the first is on line {first[kind]})", span,
                    hint=f"a policy has at most one '{kind}' line", code="semantic"))
                continue
            first[kind] = span.line
            if kind == "policy":
                name = value
            else:
                model, model_span = value, span
            statements.append(StatementInfo(kind, 0, span.line, span.end_line))
        elif kind == "budget":
            statements.append(StatementInfo(kind, len(budgets), span.line, span.end_line))
            budgets.append(value)
        elif kind == "decode":
            statements.append(StatementInfo(kind, len(decode), span.line, span.end_line))
            decode.append(value)
        else:
            statements.append(StatementInfo(kind, len(stages), span.line, span.end_line))
            stages.append(value)
    last = built[-1][2] if built else ast.Span(line=1, column=1, end_line=1, end_column=1)
    whole = ast.Span(line=1, column=1, end_line=last.end_line, end_column=last.end_column)
    policy = ast.Policy(name=name, model=model, model_span=model_span, budgets=budgets, stages=stages, decode=decode,
                        span=whole)
    return policy, statements


def _accepts(ip) -> set[str]:
    """Terminals with an action in the current LALR state (cheap; may over-approximate)."""
    state = ip.parser_state
    return {k for k in state.parse_conf.parse_table.states[state.position] if k.isupper()}


def _expected_after(tokens: list[Token], start: str) -> set[str]:
    """Terminals that can really follow `tokens` (LALR merges states, so the failing
    state's table row can list terminals that would fail after a reduction)."""
    ip = grammar().parse_interactive(start=start)
    for tok in tokens:
        ip.feed_token(tok)
    return set(ip.accepts())


def _parse_tokens(tokens: list[Token], start: str, where: _Where, terminator: Token | None) -> Tree:
    """Feed one statement's tokens to the LALR parser, checking words as they arrive."""
    ip = grammar().parse_interactive(start=start)
    parens: list[bool] = []  # one entry per open '(': True when it opens mean/sum/max(...)
    depth = 0
    prev: Token | None = None
    for i, tok in enumerate(tokens):
        accepts = _accepts(ip)
        if tok.type == "NAME" and "NAME" in accepts and "ALL" not in accepts:
            merge_word = prev.type == "_MERGE" if prev is not None else start == "merge_body"
            _check_scorer_word(tok, accepts, where, prev, merge_word)
        elif tok.type == "SITE" and "SITE" in accepts and not _SITE_RE.match(tok):
            raise _fail(f"unknown site '{show(tok)}'", where.of_token(tok),
                        expected=TERMINAL_WORDS["SITE"], hint=site_hint(str(tok)))
        elif tok.type == "_LPAR":
            combine = prev is not None and prev.type in ("MEAN", "SUM", "MAX", "PROD", "SHARE")
            parens.append(combine)
            depth += combine
            if depth > MAX_SCORE_DEPTH:
                raise _fail(
                    f"scores nest too deeply: more than {MAX_SCORE_DEPTH} levels of {'/'.join(COMBINERS)}(...)",
                    where.of_token(prev), hint="flatten the combination: mean(a, b, c) takes any number of scores",
                )
        elif tok.type == "_RPAR" and parens:
            depth -= parens.pop()
        try:
            ip.feed_token(tok)
        except UnexpectedToken:
            raise _unexpected(tok, _expected_after(tokens[:i], start), where) from None
        prev = tok
    try:
        return ip.feed_eof(tokens[-1])
    except UnexpectedToken:
        raise _unexpected_end(terminator, tokens[-1], _expected_after(tokens, start), where) from None


def _either(words) -> str:
    """`a`, `a or b`, `a, b or c`."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _check_scorer_word(tok: Token, accepts: set[str], where: _Where, prev: Token | None = None,
                       merge_word: bool = False) -> None:
    word = str(tok)
    if merge_word:  # `merge static 70% per window 4`
        if word != "static":
            raise _fail(f"unknown merge '{show(word)}'", where.of_token(tok),
                        expected="a number of pairs (merge 16) or 'static' (merge static 70% per window 4)",
                        hint=did_you_mean(word[:64], ["static"]))
        return
    if prev is not None and prev.type == "NUMBER" and "PROPORTIONAL" in accepts:  # `per segment C below T`
        if word != "below":
            raise _fail(f"unexpected word '{show(word)}' after 'per segment'", where.of_token(tok),
                        expected="'below' and a cosine such as 0.9, 'proportional' or the end of the keep",
                        hint=did_you_mean(word[:64], ["below", "proportional"]))
        return
    if accepts == {"NAME", "NUMBER", "PERCENT"}:  # `attend top p 0.9`
        if word != "p":
            raise _fail(f"unexpected word '{show(word)}'", where.of_token(tok),
                        expected="a count such as 64, a percentage such as 10% or 'p' and a share such as p 0.9")
        return
    if accepts == {"NAME", "SUM"}:  # `diverse(sum)` / `far(norm)`
        if word != "norm":
            raise _fail(f"unknown selector argument '{show(word)}'", where.of_token(tok),
                        expected="(sum) after diverse or (norm) after far")
        return
    if accepts == {"NAME"}:  # `far N with K <word> pivots`: the only pivots are text tokens
        if word != "text":
            raise _fail(f"unknown pivots '{show(word)}'", where.of_token(tok), expected="'text'",
                        hint="the pivots besides the kept tokens are text tokens: 'with 4 text pivots by knorm'")
        return
    if word in SCORERS:
        return
    candidates = list(SCORERS) + list(COMBINERS)
    if "DIVERSE" in accepts:
        candidates += list(SELECTORS) + ["buffers", "cls_token"]
    raise _fail(
        f"unknown scorer '{show(word)}'",
        where.of_token(tok),
        expected=expected_phrase(accepts),
        hint=did_you_mean(word[:64], candidates),
    )


_UNEXPECTED_HINTS = {
    "_TOP": "'top' follows a score, as in 'cls top 10%'",
    "_SEED": "'seed' follows 'random N', as in 'random 64 seed 0'",
}


def has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _unexpected(tok: Token, expected: set[str], where: _Where) -> _StatementError:
    hint = None
    if expected == {"MEAN", "SUM", "MAX", "EMA"}:  # only after a layer range
        hint = "a layer range is aggregated over its layers, as in 'cls@vit.layer8..22 sum' (or mean, max, ema)"
    elif tok.type in ("NAME", "SITE"):
        candidates = [k for k in map(keyword_of, expected) if k]
        if "SITE" in expected:
            candidates += site_candidates(str(tok))
        hint = did_you_mean(str(tok)[:64], candidates)
    if hint is None and tok.type in ("_AT", "_POLICY", "_MODEL", "_BUDGET") and "$END" in expected:
        hint = "separate statements with ';' or a new line"
    if hint is None and tok.type in _UNEXPECTED_HINTS:
        hint = _UNEXPECTED_HINTS[tok.type]
    if hint is None and tok.type == "NUMBER" and expected == {"GRID"}:
        hint = f"write rows x columns, as in {tok}x{tok}"
    if hint is None and tok.type == "GRID":
        hint = f"'per crop' takes no grid; for an even spatial split write 'per region {tok}'"
    if hint is None and tok.type == "_LAYER" and expected == {"_LAYERS"}:
        hint = "write 'every layer' or 'every N layers'"
    if hint is None and "_THEN" in expected:
        hint = next((o.hints[tok.type] for o in rest_options.options().values() if tok.type in o.hints), None)
    return _fail(f"unexpected {describe_token(tok)}", where.of_token(tok),
                 expected=expected_phrase(expected, end=where.end_words), hint=hint)


def _unexpected_end(terminator: Token | None, last: Token, expected: set[str], where: _Where) -> _StatementError:
    if terminator is not None and terminator.type == "_SEMI":
        what, span = "';'", where.of_token(terminator)
    else:
        what = "end of line" if terminator is not None else (
            "end of input" if where.end_words == END_OF_STATEMENT else "end of the value")
        span = where.after(last)
    return _fail(f"unexpected {what}", span, expected=expected_phrase(expected - {"$END"}, end=where.end_words))


def _lex_error(exc: UnexpectedCharacters, text: str, current: list[Token], where: _Where,
               start: str = "statement") -> Diagnostic:
    """A character no token starts with: an unterminated string, junk, a stray symbol."""
    try:  # what the statement so far would accept next (or its own earlier error)
        expected: set[str] | None = _expected_after(current, start)
    except UnexpectedToken:
        try:
            _parse_tokens(current, start, where, None)
        except _StatementError as err:
            return err.diagnostic
        expected = None
    ch = text[exc.pos_in_stream]
    span = where.span(exc.line, exc.column, exc.line, exc.column + 1)
    hint = None
    if ch == '"':
        rest = text[exc.pos_in_stream + 1 :].split("\n", 1)[0]
        if '"' not in rest.replace('\\"', ""):
            end = exc.column + 1 + len(rest)
            return Diagnostic("unterminated string", where.span(exc.line, exc.column, exc.line, max(end, exc.column + 1)),
                              expected="a closing '\"' on the same line", code="syntax")
        message = "invalid string"
    else:
        message = f"unexpected character {describe_char(ch)}"
    if ch == "%" and current and current[-1].type == "NUMBER":
        hint = f"write a percentage without a space: {current[-1]}%"
    elif ch in "<>=!" and expected and "LE" in expected:
        hint = "a budget is an upper bound: use '<=' or '<'"
    elif ch == "-" and expected and "NUMBER" in expected:
        hint = "quantities cannot be negative"
    elif ch in "\u00a0\u2009\u202f\u200b":
        hint = "replace it with a plain space"
    elif ch in "\u201c\u201d":
        hint = 'use straight double quotes: "..."'
    exp = expected_phrase(expected, end=where.end_words) if expected is not None else None
    return Diagnostic(message, span, expected=exp, hint=hint, code="syntax")


# ---------------------------------------------------------------------------------------
# Tree -> AST


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    msg = str(err.get("msg", exc))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


class _Builder:
    """Builds AST nodes from one statement's parse tree (or a YAML value's)."""

    def __init__(self, where: _Where):
        self.where = where

    def node(self, cls, span: ast.Span, **fields):
        try:
            return cls(span=span, **fields)
        except ValidationError as exc:
            raise _fail(_validation_message(exc), span, code="semantic") from None

    def span(self, item: Tree | Token) -> ast.Span:
        return self.where.of_token(item) if isinstance(item, Token) else self.where.of_tree(item)

    # -- statements ---------------------------------------------------------------------
    def statement(self, tree: Tree) -> tuple[str, Any, ast.Span]:
        span = self.span(tree)
        if tree.data in ("policy_line", "model_line"):
            return _HEADERS[tree.data], self.string(tree.children[0]), span
        if tree.data == "budget_line":
            return "budget", self.budget(tree.children[0], span), span
        if tree.data == "decode_stage":
            site, count = tree.children
            return "decode", self.node(ast.DecodeSelect, span, site=self.site(site), **self.decode_count(count)), span
        return "stage", self.stage(tree), span

    def decode_count(self, tree: Tree) -> dict:
        """`K` / `K%` as a quantity, or `p P` as the share P of the visual entries' attention."""
        if len(tree.children) == 1:
            return {"qty": self.quantity(tree.children[0])}
        _, tok = tree.children
        mass = self.number(tok)
        if not 0 < mass <= 1:
            raise _fail(f"'top p' takes a share of the attention in (0, 1], got {show(str(tok))}", self.span(tok),
                        expected="a share such as p 0.9", code="semantic")
        return {"mass": float(mass)}

    def string(self, tok: Token) -> str:
        try:
            value = json.loads(str(tok), strict=False)
        except ValueError:
            value = None
        # JSON admits a lone surrogate (\ud800), which no UTF-8 output can carry
        if value is None or has_surrogate(value):
            raise _fail(f"invalid escape in string {show(str(tok))}", self.span(tok),
                        hint=r'strings use JSON escapes: \" \\ \n \t \uXXXX') from None
        return value

    def budget(self, tree: Tree, span: ast.Span | None = None) -> ast.Budget:
        metric, comparison, qty = tree.children
        tok = qty.children[0]
        value = self.number(tok)
        percent = tok.type == "PERCENT"
        return self.node(ast.Budget, span or self.span(tree), metric=str(metric.children[0]),
                         op=str(comparison.children[0]), value=value, percent=percent)

    def stage(self, tree: Tree) -> ast.Stage:
        head, action, *tail = tree.children
        extra = {}
        if tail:
            extra = dict(renumber=True, renumber_span=self.span(tail[0]))
        if isinstance(head, Tree) and head.data == "repeat":
            step_tree, start, end = head.children
            step = 1
            if step_tree.children:
                tok = step_tree.children[0]
                value = float(str(tok))
                if not value.is_integer() or not 1 <= value <= ast.MAX_LAYER:
                    raise _fail(f"'every {show(str(tok))} layers' needs a whole number of layers, 1 or more",
                                self.span(tok), expected="a step such as 'every 2 layers'", code="semantic")
                step = int(value)
            repeat = self.node(ast.Repeat, self.span(head), step=step, end=self.site(end))
            return self.node(ast.Stage, self.span(tree), site=self.site(start), action=self.action(action),
                             repeat=repeat, **extra)
        return self.node(ast.Stage, self.span(tree), site=self.site(head), action=self.action(action), **extra)

    def site(self, tree: Tree | Token) -> ast.Site:
        tok = tree.children[0] if isinstance(tree, Tree) else tree
        text = str(tok)
        span = self.span(tok)
        m = _SITE_RE.match(text)
        if not m:
            raise _fail(f"unknown site '{show(text)}'", span, expected=TERMINAL_WORDS["SITE"], hint=site_hint(text))
        if m.group(1) is None:
            return self.node(ast.Site, span, tower="vit", index=None)
        digits = m.group(2).lstrip("-").lstrip("0")
        if len(digits) > 9:
            raise _fail(f"layer index in '{show(text)}' is out of any model's range", span, code="semantic")
        return self.node(ast.Site, span, tower=m.group(1), index=int(m.group(2)))

    # -- actions ------------------------------------------------------------------------
    def action(self, tree: Tree):
        span = self.span(tree)
        kind = tree.data
        if kind == "keep":
            terms = region = rest = None
            for child in tree.children:
                if child.data == "terms":
                    terms = self.terms(child)
                elif child.data == "region":
                    region = self.region(child.children[0], self.span(child))
                else:  # what happens to the rest: the option whose rule this is builds it
                    rest = rest_options.by_rule(child.data).build(self, child)
            return self.node(ast.Keep, span, terms=terms, region=region, rest=rest)
        if kind == "merge":
            return self.node(ast.Merge, span, **self.merge_body(tree.children[0]))
        if kind == "pool":
            rows, cols = self.grid(tree.children[0], "pool")
            return self.node(ast.Pool, span, rows=rows, cols=cols)
        return self.node(ast.DropAll, span)

    def terms(self, tree: Tree) -> list:
        return [self.term(t) for t in tree.children]

    def term(self, tree: Tree):
        span = self.span(tree)
        if tree.data == "top_term":
            score, qty, *rest = tree.children
            adaptive = self.adaptive(rest[0]) if rest else None
            return self.node(ast.TopTerm, span, score=self.score(score), qty=self.quantity(qty), adaptive=adaptive)
        if tree.data == "cls_token_term":
            return self.node(ast.ClsTokenTerm, span)
        if tree.data == "buffers_term":
            qty = self.quantity(tree.children[0]) if tree.children else None
            return self.node(ast.BuffersTerm, span, qty=qty)
        selector, *rest = tree.children
        kind = str(selector.children[0])
        spread = "min"
        normed = False
        if rest[0].data == "selector_arg":
            arg = rest.pop(0)
            word = str(arg.children[0])
            owner = {"sum": "diverse", "norm": "far"}.get(word)
            if owner is None:
                raise _fail(f"unknown selector argument '{show(word)}'", self.span(arg),
                            expected="(sum) after diverse or (norm) after far", code="semantic")
            if kind != owner:
                raise _fail(f"'({word})' belongs to '{owner}', not to '{kind}'", self.span(arg),
                            hint="diverse(sum) is max-sum diversity, far(norm) compares normed hidden states; "
                                 "the other selectors take no argument", code="semantic")
            if word == "sum":
                spread = "sum"
            else:
                normed = True
        qty, *rest = rest
        seed = text_pivots = pivot_score = None
        if rest and rest[0].data == "text_pivots":
            clause = rest[0]
            count_tok, word, score_tree = clause.children
            if kind != "far":
                raise _fail(f"text pivots belong to 'far', not to '{kind}'", self.span(clause),
                            hint="far N with 4 text pivots by knorm: DART's pivots", code="semantic")
            if str(word) != "text":
                raise _fail(f"unknown pivots '{show(str(word))}'", self.span(word), expected="'text'",
                            hint="the pivots besides the kept tokens are text tokens: 'with 4 text pivots by knorm'",
                            code="semantic")
            text_pivots = self.number(count_tok)
            if not isinstance(text_pivots, int) or not 1 <= text_pivots <= ast.MAX_COUNT:
                raise _fail(f"'with {show(str(count_tok))} text pivots' needs a whole number of pivots, 1 or more",
                            self.span(count_tok), expected="a count such as 'with 4 text pivots'", code="semantic")
            pivot_score = self.score(score_tree)
        elif rest:
            seed_tree = rest[0]
            seed = self.seed(seed_tree.children[0])
            if kind != "random":
                raise _fail(f"'seed' belongs to 'random', not to '{kind}'", self.span(seed_tree),
                            hint=f"'{kind}' is deterministic; remove 'seed {seed}'", code="semantic")
        return self.node(ast.SelectTerm, span, kind=kind, qty=self.quantity(qty), seed=seed, spread=spread,
                         text_pivots=text_pivots, pivot_score=pivot_score, normed=normed)

    def adaptive(self, tree: Tree) -> ast.Adaptive:
        span = self.span(tree)
        if len(tree.children) == 1:
            return self.node(ast.Adaptive, span, kind="outliers")
        if isinstance(tree.children[0], Token) and tree.children[0].type == "LOF":
            return self.lof(tree, span)
        score_tree, steps_tok = tree.children
        steps = self.number(steps_tok)
        if not isinstance(steps, int) or not 1 <= steps <= ast.MAX_LAYER:
            raise _fail(f"'over {show(str(steps_tok))} layers' needs a whole number of layers, 1 or more",
                        self.span(steps_tok), expected="a layer count such as 'over 20 layers'",
                        hint="the last cut of a schedule (no layers left) is a plain 'top N'", code="semantic")
        return self.node(ast.Adaptive, span, kind="entropy", score=self.score(score_tree), steps=steps)

    def lof(self, tree: Tree, span) -> ast.Adaptive:
        """`by lof(K)` / `by lof(K, rest)`."""
        _, k_tok, *rest = tree.children
        k = self.number(k_tok)
        if not isinstance(k, int) or not 1 <= k <= ast.MAX_LOF_NEIGHBOURS:
            raise _fail(f"'lof({show(str(k_tok))})' needs a whole number of neighbours, 1 to {ast.MAX_LOF_NEIGHBOURS}",
                        self.span(k_tok), expected="a neighbour count such as 'lof(20)'", code="semantic")
        return self.node(ast.Adaptive, span, kind="lof", neighbours=k, of_rest=bool(rest))

    def seed(self, tok: Token) -> int:
        value = self.number(tok)
        if isinstance(value, float):
            if not value.is_integer():
                raise _fail(f"a seed must be a whole number, got {show(str(tok))}", self.span(tok), code="semantic")
            value = int(value)
        if value > MAX_SEED:
            raise _fail(f"a seed must lie in 0..2^63-1, got {show(str(tok))}", self.span(tok), code="semantic")
        return value

    def merge_body(self, tree: Tree) -> dict:
        """`merge Q` (ToMe), or `merge static Q per window N | per segment C` (DyCoke's TTM)."""
        if len(tree.children) == 1:
            return {"pairs": self.quantity(tree.children[0])}
        word, qty, region = tree.children
        if str(word) != "static":
            raise _fail(f"unknown merge '{show(str(word))}'", self.span(word),
                        expected="a number of pairs (merge 16) or 'static' (merge static 70% per window 4)",
                        hint=did_you_mean(str(word), ["static"]))
        reg = self.region(region.children[0], self.span(region))
        if reg.kind not in ("window", "segment"):
            raise _fail(f"'merge static' merges across the frames of a window or segment, not per {reg.kind}",
                        reg.span, expected="'per window N' or 'per segment C'", code="semantic")
        return {"pairs": self.quantity(qty), "static": True, "region": reg}

    def whole(self, tok: Token, what: str, high: int) -> int:
        value = self.number(tok)
        if not isinstance(value, int) or not 1 <= value <= high:
            raise _fail(f"{what} needs a whole number between 1 and {high}, got {show(str(tok))}",
                        self.span(tok), code="semantic")
        return value

    def region(self, tree: Tree, span: ast.Span) -> ast.Region:
        kind = str(tree.children[0])
        proportional = str(tree.children[-1].data if isinstance(tree.children[-1], Tree) else "") == "proportional"
        if kind == "window":
            return self.node(ast.Region, span, kind="window", window=self.whole(tree.children[1], "'per window'", 4096),
                             proportional=proportional)
        if kind == "segment":
            below = None
            parts = [c for c in tree.children[2:] if isinstance(c, Tree) and c.data == "segment_below"]
            if parts:
                word, tok = parts[0].children
                if str(word) != "below":
                    raise _fail(f"unexpected '{show(str(word))}' after 'per segment'", self.span(word),
                                expected="'below' and a cosine such as 0.9, 'proportional' or the end of the keep",
                                hint=did_you_mean(str(word), ["below"]))
                below = float(self.number(tok))
                if not below <= 1:
                    raise _fail(f"'below' takes a cosine similarity between 0 and 1, got {show(str(tok))}",
                                self.span(tok), code="semantic")
            return self.node(ast.Region, span, kind="segment",
                             segments=self.whole(tree.children[1], "'per segment'", 4096), below=below,
                             proportional=proportional)
        if kind == "crop":
            return self.node(ast.Region, span, kind="crop")
        if kind == "frame":
            option = tree.children[1].data if len(tree.children) > 1 else ""
            if option == "frame_softmax":
                tok = tree.children[1].children[1]
                temperature = float(self.number(tok))
                if not 0 < temperature <= 1000:
                    raise _fail(f"'softmax' takes a temperature above 0 (at most 1000), got {show(str(tok))}",
                                self.span(tok), code="semantic")
                return self.node(ast.Region, span, kind="frame", softmax=temperature)
            return self.node(ast.Region, span, kind="frame", proportional=option == "proportional")
        if kind == "chunk":
            tok = tree.children[1]
            value = self.number(tok)
            if not isinstance(value, int) or not 1 <= value <= 4096:
                raise _fail(f"'per chunk' needs a whole number of chunks between 1 and 4096, got {show(str(tok))}",
                            self.span(tok), code="semantic")
            return self.node(ast.Region, span, kind="chunk", chunks=value, proportional=len(tree.children) > 2)
        rows, cols = self.grid(tree.children[1], "region")
        return self.node(ast.Region, span, kind="region", rows=rows, cols=cols, proportional=len(tree.children) > 2)

    def grid(self, tree: Tree | Token, what: str) -> tuple[int, int]:
        tok = tree.children[0] if isinstance(tree, Tree) else tree
        text = str(tok)
        rows, cols = text.split("x")
        limit = 64
        if max(len(rows.lstrip("0")), len(cols.lstrip("0"))) > 3 or not (1 <= int(rows) <= limit and 1 <= int(cols) <= limit):
            raise _fail(f"a {what} grid must be between 1x1 and {limit}x{limit}, got {show(text)}",
                        self.span(tok), code="semantic")
        return int(rows), int(cols)

    # -- scores -------------------------------------------------------------------------
    def score(self, tree: Tree):
        span = self.span(tree)
        if tree.data == "combine":
            op_tree, *args = tree.children
            op = str(op_tree.children[0])
            if op == "share" and len(args) != 1:
                raise _fail("share(...) normalises one score", span,
                            hint="write share(cls) + ... as sum(share(cls), share(vsim))", code="semantic")
            if op != "share" and len(args) < 2:
                raise _fail(f"{op}(...) needs at least two scores", span,
                            hint=f"to use a single score, write it without {op}(...)", code="semantic")
            at = to = over = None
            if args and args[-1].data == "range_op":
                *args, range_tree, op_tree_range = args
                at, to = self.layer_range(range_tree.children[0])
                over = str(op_tree_range.children[0])
            scores, weights = [], []
            for arg in args:
                *weight_tok, score_tree = arg.children
                weights.append(self.number(weight_tok[0]) if weight_tok else 1)
                scores.append(self.score(score_tree))
            return self.node(ast.ScoreCombine, span, op=op, args=scores,
                             weights=[float(w) for w in weights] if any(w != 1 for w in weights) else None,
                             at=at, to=to, over=over)
        name_tok, *rest = tree.children
        name = str(name_tok)
        info = SCORERS.get(name)
        if info is None:  # the token loop checks this first; kept for YAML values
            raise _fail(f"unknown scorer '{show(name)}'", self.span(name_tok),
                        expected=f"a scorer ({', '.join(SCORERS)})",
                        hint=did_you_mean(name[:64], list(SCORERS) + list(COMBINERS)))
        args: list[str] = []
        at = to = over = heads = None
        no_rope = image_keys = False
        for child in rest:
            if child.data == "score_args":
                args, heads, no_rope, image_keys = self.score_args(info, child)
            elif child.data == "layer_range":
                at, to = self.layer_range(child.children[0])
            elif child.data == "range_op":
                over = str(child.children[0])
            else:
                at = self.site(child)
        return self.node(ast.ScoreRef, span, name=name, args=args, at=at, to=to, over=over, heads=heads,
                         no_rope=no_rope, image_keys=image_keys)

    def layer_range(self, tok: Token) -> tuple[ast.Site, int]:
        text = str(tok)
        m = _RANGE_RE.match(text)
        span = self.span(tok)
        if not m:
            raise _fail(f"unknown layer range '{show(text)}'", span, expected=TERMINAL_WORDS["SITE_RANGE"],
                        hint="a range runs over vit.layerN or llm.layerN, e.g. cls@vit.layer8..22 sum")
        for digits in (m.group(2), m.group(3)):
            if len(digits.lstrip("-").lstrip("0")) > 9 or abs(int(digits)) > ast.MAX_LAYER:
                raise _fail(f"layer index in '{show(text)}' is out of any model's range", span, code="semantic")
        return self.node(ast.Site, span, tower=m.group(1), index=int(m.group(2))), int(m.group(3))

    def score_args(self, info, tree: Tree) -> tuple[list[str], str | int | None, bool, bool]:
        """The query arguments, the head aggregate (`mean`, `sum`, `max`, `whole` or `top H
        heads` as the int H, at most one), `no_rope` and `image_keys`, the last three for
        attention scores only."""
        top_heads = [c.children[0] for c in tree.children if isinstance(c.children[0], Tree)]
        toks = [c.children[0] for c in tree.children if not isinstance(c.children[0], Tree)]
        key_toks = [t for t in toks if str(t) == "image_keys"]
        toks = [t for t in toks if str(t) != "image_keys"]
        if key_toks and not (info.attention and "llm" in info.towers):
            raise _fail(f"'{info.name}' reads no attention softmax over LLM keys, so 'image_keys' changes nothing",
                        self.span(key_toks[0]), hint=f"write '{info.name}'", code="semantic")
        if len(key_toks) > 1:
            raise _fail("'image_keys' is written once", self.span(key_toks[1]), code="semantic")
        rope_toks = [t for t in toks if str(t) == "no_rope"]
        toks = [t for t in toks if str(t) != "no_rope"]
        if rope_toks and not info.rope:
            raise _fail(f"'{info.name}' reads no attention, so it has no RoPE to leave out",
                        self.span(rope_toks[0]), hint=f"write '{info.name}'", code="semantic")
        if len(rope_toks) > 1:
            raise _fail("'no_rope' is written once", self.span(rope_toks[1]), code="semantic")
        head_toks = [t for t in toks if str(t) in COMBINERS or str(t) == WHOLE_HEAD]
        toks = [t for t in toks if str(t) not in COMBINERS and str(t) != WHOLE_HEAD]
        whole = [t for t in head_toks if str(t) == WHOLE_HEAD]
        if whole and info.canonical != "cls":
            raise _fail(f"'{WHOLE_HEAD}' (the layer's q and k as one head of the full width) is read by 'cls' only",
                        self.span(whole[0]), expected="cls(whole)", code="semantic")
        heads: str | int | None = None
        aggregates = sorted([(t.start_pos, t, None) for t in head_toks]
                            + [(h.meta.start_pos, h, h) for h in top_heads], key=lambda e: e[0])
        if aggregates:
            first, first_tree = aggregates[0][1], aggregates[0][2]
            where = self.span(first)
            if not info.attention:
                raise _fail(f"'{info.name}' reads no attention heads", where,
                            hint=f"write '{info.name}'", code="semantic")
            if len(aggregates) > 1:
                raise _fail("one head aggregate per score", self.span(aggregates[1][1]),
                            expected="one of mean, sum, max, whole or top H heads", code="semantic")
            if first_tree is None:
                heads = str(first)
            else:
                count = first_tree.children[0]
                value = self.number(count)
                if not isinstance(value, int) or value < 1:
                    raise _fail(f"'top {show(str(count))} heads' needs a whole number of heads", self.span(count),
                                expected="a head count of 1 or more, as in text(all, top 14 heads)",
                                code="semantic")
                heads = value
        if not toks:
            return [], heads, bool(rope_toks), bool(key_toks)
        if info.max_args == 0:
            raise _fail(f"scorer '{info.name}' takes no arguments", self.span(tree),
                        hint=f"write '{info.name}'", code="semantic")
        if len(toks) > info.max_args:
            raise _fail(f"scorer '{info.name}' takes at most {info.max_args} argument"
                        f"{'s' if info.max_args > 1 else ''}", self.span(tree), code="semantic")
        for tok in toks:
            if str(tok) not in info.args:
                raise _fail(f"unknown argument '{show(str(tok))}' for scorer '{info.name}'", self.span(tok),
                            expected=_either(info.args), hint=did_you_mean(str(tok)[:64], info.args),
                            code="semantic")
        return [str(t) for t in toks], heads, bool(rope_toks), bool(key_toks)

    # -- numbers ------------------------------------------------------------------------
    def number(self, tok: Token) -> int | float:
        """A NUMBER or PERCENT token's value: int when written as an integer (or, for a
        percentage, when integral), float otherwise. Huge literals are refused before any
        conversion, so no OverflowError or int-digits limit can surface."""
        text = str(tok)
        percent = tok.type == "PERCENT"
        body = text[:-1] if percent else text
        whole = re.split(r"[.eE]", body, maxsplit=1)[0].lstrip("0")
        value: int | float | None = None
        if len(whole) <= MAX_NUMBER_DIGITS:
            if body.isdigit():
                value = int(body)
            else:
                value = float(body)
                if not math.isfinite(value):
                    value = None
                elif percent and value.is_integer():
                    value = int(value)
        if value is None:
            raise _fail(f"number {show(text, 24)} is too large", self.span(tok), code="semantic",
                        hint="counts are at most 1000000 tokens, percentages at most 100%")
        return value

    def quantity(self, tree: Tree | Token) -> ast.Quantity:
        tok = tree.children[0] if isinstance(tree, Tree) else tree
        return self.node(ast.Quantity, self.span(tok), value=self.number(tok), percent=tok.type == "PERCENT")


# ---------------------------------------------------------------------------------------
# Values inside other files (the YAML form)


def parse_value(text: str, start: str, where: _Where):
    """Parse one value (a term, a quantity, ...) from the rule `start`.

    Raises `_StatementError` located by `where`; the caller wraps it into a PolicyError.
    """
    tokens: list[Token] = []
    try:
        for tok in lex_all(text):
            if tok.type in ("WS", "COMMENT"):
                continue
            if tok.type in _SEPARATORS:
                raise _fail(f"unexpected {'new line' if tok.type == '_NL' else repr(str(tok))} in a value",
                            where.of_token(tok), hint="a YAML value holds one item; use a list for several")
            tokens.append(tok)
    except UnexpectedCharacters as exc:
        raise _StatementError(_lex_error(exc, text, tokens, where, start)) from None
    if not tokens:
        raise _fail("empty value", where.span(1, 1, 1, 1), expected=_START_WORDS.get(start))
    tree = _parse_tokens(tokens, start, where, None)
    b = _Builder(where)
    if start == "term":
        return b.term(tree)
    if start == "terms":
        return b.terms(tree)
    if start == "quantity":
        return b.quantity(tree)
    if start == "budget_body":
        return b.budget(tree)
    if start == "site":
        return b.site(tree)
    if start == "region_body":
        return b.region(tree, b.span(tree))
    if start == "grid":
        return b.grid(tree, "pool")
    if start == "decode_count":
        return b.decode_count(tree)
    if start == "merge_body":
        return b.merge_body(tree)
    raise ValueError(start)


_START_WORDS = {
    "term": "a term such as 'cls top 10%', 'diverse 64' or 'buffers'",
    "terms": "terms such as 'cls top 10% + buffers'",
    "quantity": "a token count such as 64 or a percentage such as 10%",
    "budget_body": "a budget such as 'flops <= 25%'",
    "site": TERMINAL_WORDS["SITE"],
    "region_body": "'crop', 'frame', 'region RxC', 'chunk N', 'window N' or 'segment C'",
    "grid": TERMINAL_WORDS["GRID"],
    "decode_count": "a count such as 64, a percentage such as 10% or a share such as p 0.9",
    "merge_body": "a number of pairs such as 16, or 'static 70% per window 4'",
}


def iter_terminals() -> Iterator[str]:
    """Every terminal name in the grammar (for the words-table completeness test)."""
    for t in grammar().terminals:
        yield t.name
