"""Canonical `.vt` text for a policy.

Canonical form: header lines first (policy, model, then budgets in source order), then
one stage per line in source order, decode stages last; single spaces between words; no spaces inside
`name(args)`, around `@` or after `(`; `, ` between arguments; `+` with a space on each
side; numbers without a trailing `.0` and never in exponent notation (10%, 12.5%,
3200000000000); strings as JSON string literals.

`format_policy(policy)` prints an AST (comments are not part of the AST).
`format_source(text)` is what `vtdsl fmt` runs: it keeps comments and paragraph breaks.
Both satisfy `fmt(fmt(x)) == fmt(x)` and `parse(fmt(ast)) == ast`.
"""

from __future__ import annotations

import bisect
from decimal import Decimal

from ..ops import rest as rest_options
from . import ast


def format_number(value: int | float) -> str:
    if isinstance(value, bool):
        raise TypeError("a number, not a bool")
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 1e16:
        # Past 2**53 a float's integer digits are noise (1e30 -> 1000...19884624838656, over
        # the parser's digit limit); Python's shortest form '1e+30' reads back exactly.
        return repr(value)
    if value.is_integer():
        return str(int(value))
    # Shortest round-tripping decimal, written out positionally (1e-07 -> 0.0000001).
    return format(Decimal(repr(value)), "f")


def quote(text: str) -> str:
    """A JSON string literal that stays on one line and is valid UTF-8."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def format_quantity(q: ast.Quantity) -> str:
    return format_number(q.value) + ("%" if q.percent else "")


def format_score(score) -> str:
    if isinstance(score, ast.ScoreCombine):
        weights = score.weights or [1] * len(score.args)
        args = [("" if w == 1 else f"{format_number(w)} * ") + format_score(a) for w, a in zip(weights, score.args)]
        text = f"{score.op}({', '.join(args)})"
        if score.to is not None:
            text += f"@{score.at.text()}..{score.to} {score.over}"
        return text
    text = score.name
    heads = [] if score.heads is None else [f"top {score.heads} heads" if isinstance(score.heads, int) else score.heads]
    args = (list(score.args) + heads + (["no_rope"] if score.no_rope else [])
            + (["image_keys"] if getattr(score, "image_keys", False) else []))
    if args:
        text += f"({', '.join(args)})"
    if score.at is not None:
        text += "@" + score.at.text()
    if score.to is not None:
        text += f"..{score.to} {score.over}"
    return text


def format_adaptive(adaptive) -> str:
    if adaptive.kind == "outliers":
        return " by outliers"
    if adaptive.kind == "lof":
        return f" by lof({adaptive.neighbours}, rest)" if adaptive.of_rest else f" by lof({adaptive.neighbours})"
    layers = "layer" if adaptive.steps == 1 else "layers"
    return f" by entropy({format_score(adaptive.score)}) over {adaptive.steps} {layers}"


def format_term(term) -> str:
    if isinstance(term, ast.TopTerm):
        text = f"{format_score(term.score)} top {format_quantity(term.qty)}"
        if term.adaptive is not None:
            text += format_adaptive(term.adaptive)
        return text
    if isinstance(term, ast.ClsTokenTerm):
        return "cls_token"
    if isinstance(term, ast.BuffersTerm):
        return "buffers" if term.qty is None else f"buffers {format_quantity(term.qty)}"
    arg = "(sum)" if term.spread == "sum" else "(norm)" if getattr(term, "normed", False) else ""
    text = f"{term.kind}{arg} {format_quantity(term.qty)}"
    if term.seed is not None:
        text += f" seed {term.seed}"
    if term.text_pivots is not None:
        text += f" with {term.text_pivots} text pivots by {format_score(term.pivot_score)}"
    return text


def format_merge_body(action: ast.Merge) -> str:
    """What follows `merge`: the pairs, or `static Q per window N | per segment C`."""
    if not action.static:
        return format_quantity(action.pairs)
    return f"static {format_quantity(action.pairs)} per {format_region(action.region)}"


def format_region(region: ast.Region) -> str:
    if region.kind == "crop":
        return "crop"
    if region.kind == "frame":
        if region.softmax is not None:
            return f"frame softmax {format_number(region.softmax)}"
        return "frame" + (" proportional" if region.proportional else "")
    if region.kind == "chunk":
        return f"chunk {region.chunks}" + (" proportional" if region.proportional else "")
    if region.kind == "window":
        return f"window {region.window}" + (" proportional" if region.proportional else "")
    if region.kind == "segment":
        below = "" if region.below is None else f" below {format_number(region.below)}"
        return f"segment {region.segments}{below}" + (" proportional" if region.proportional else "")
    return f"region {region.rows}x{region.cols}" + (" proportional" if region.proportional else "")


def format_action(action) -> str:
    if isinstance(action, ast.Keep):
        text = "keep " + " + ".join(format_term(t) for t in action.terms)
        if action.region is not None:
            text += " per " + format_region(action.region)
        if action.rest is not None:
            text += rest_options.by_node(action.rest).text(action.rest)
        return text
    if isinstance(action, ast.Merge):
        return "merge " + format_merge_body(action)
    if isinstance(action, ast.Pool):
        return f"pool {action.rows}x{action.cols}"
    return "drop all"


def format_repeat(stage: ast.Stage) -> str:
    step = "layer" if stage.repeat.step == 1 else f"{stage.repeat.step} layers"
    return f"every {step} from {stage.site.text()} to {stage.repeat.end.text()}"


def format_stage(stage: ast.Stage) -> str:
    head = format_repeat(stage) if stage.repeat is not None else f"at {stage.site.text()}"
    return f"{head} {format_action(stage.action)}{' renumber' if stage.renumber else ''}"


def format_decode_count(sel: ast.DecodeSelect) -> str:
    return f"p {format_number(sel.mass)}" if sel.mass is not None else format_quantity(sel.qty)


def format_decode(sel: ast.DecodeSelect) -> str:
    return f"during decode at {sel.site.text()} attend top {format_decode_count(sel)}"


def format_budget_body(budget: ast.Budget) -> str:
    return f"{budget.metric} {budget.op} {format_number(budget.value)}{'%' if budget.percent else ''}"


def format_budget(budget: ast.Budget) -> str:
    return "budget " + format_budget_body(budget)


def _statement_lines(policy: ast.Policy) -> list[tuple[tuple[str, int], str]]:
    out: list[tuple[tuple[str, int], str]] = []
    if policy.name is not None:
        out.append((("policy", 0), f"policy {quote(policy.name)}"))
    if policy.model is not None:
        out.append((("model", 0), f"model {quote(policy.model)}"))
    out += [(("budget", i), format_budget(b)) for i, b in enumerate(policy.budgets)]
    out += [(("stage", i), format_stage(s)) for i, s in enumerate(policy.stages)]
    out += [(("decode", i), format_decode(d)) for i, d in enumerate(policy.decode)]
    return out


def format_policy(policy: ast.Policy) -> str:
    """The canonical `.vt` text of an AST ('' for an empty policy)."""
    lines = [text for _, text in _statement_lines(policy)]
    return "".join(line + "\n" for line in lines)


def format_source(text: str, filename: str = "<policy>") -> str:
    """Canonical `.vt` text of a source file, keeping its comments.

    A comment on its own line stays above the statement that follows it (and moves with
    it when header lines are put first); a comment after a statement stays on that
    statement's line; comments after the last statement stay at the end. One blank line is
    kept wherever the source had one or more between two lines of content.
    """
    from .parser import parse_source

    parsed = parse_source(text, filename)
    src_lines = parsed.source.split("\n")
    stmts = parsed.statements

    content_lines = sorted({s.line for s in stmts} | {c.line for c in parsed.comments})
    stmt_lines = [s.line for s in stmts]  # non-decreasing: statements are in source order
    ends_on: dict[int, int] = {}  # line -> last statement ending there
    for i, s in enumerate(stmts):
        ends_on[s.end_line] = i

    def blank_before(line: int) -> bool:
        k = bisect.bisect_left(content_lines, line)
        return k > 0 and line - content_lines[k - 1] > 1

    leading: dict[int, list[tuple[bool, str]]] = {i: [] for i in range(len(stmts))}
    trailing: dict[int, str] = {}
    tail: list[tuple[bool, str]] = []
    for comment in parsed.comments:
        body = str(comment).rstrip()
        if comment.line in ends_on and src_lines[comment.line - 1][: comment.column - 1].strip():
            trailing[ends_on[comment.line]] = body
            continue
        k = bisect.bisect_right(stmt_lines, comment.line)  # first statement below the comment
        item = (blank_before(comment.line), body)
        (leading[k] if k < len(stmts) else tail).append(item)

    texts = dict(_statement_lines(parsed.policy))
    rank = {"policy": 0, "model": 1, "budget": 2, "stage": 3, "decode": 4}
    order = sorted(range(len(stmts)), key=lambda i: (rank[stmts[i].kind], i))

    out: list[str] = []

    def emit(blank: bool, line: str) -> None:
        if blank and out:
            out.append("")
        out.append(line)

    seen_lines: set[int] = set()
    for i in order:
        s = stmts[i]
        for blank, body in leading[i]:
            emit(blank, body)
        # The second statement of `a; b` starts no paragraph of its own.
        first_on_line = s.line not in seen_lines
        seen_lines.add(s.line)
        line = texts[(s.kind, s.index)]
        if i in trailing:
            line += "  " + trailing[i]
        emit(first_on_line and blank_before(s.line), line)
    for blank, body in tail:
        emit(blank, body)
    return "".join(line + "\n" for line in out)
