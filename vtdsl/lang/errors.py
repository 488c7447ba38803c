"""One error family for everything a user can get wrong in a policy.

A `Diagnostic` is a located message (error or warning); a `PolicyError` carries one or
more error diagnostics. Every stage of the pipeline (parser, IR passes, cost budgets)
reports through these, so the CLI prints one format everywhere:

    policy.vt:3:12: error: unknown scorer 'divers'
      at llm.layer2 keep divers 64
                         ^^^^^^
      expected: a scorer (cls, attn, text, ...) or a selector (diverse, uniform, ...)
      hint: did you mean 'diverse'?
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Literal

from .ast import Span


@dataclass
class Diagnostic:
    message: str
    span: Span | None = None
    severity: Literal["error", "warning"] = "error"
    expected: str | None = None
    hint: str | None = None
    code: str = "policy"

    def format(self, source: str | None = None, filename: str = "<policy>") -> str:
        if self.span is not None:
            line, col = self.span.line, self.span.column
            where = f"{filename}:{line}:{col}: "
        else:
            # not about a place in the source (a command-line option, a model name): no
            # made-up line and column
            where = "" if filename == "<policy>" else f"{filename}: "
        out = [f"{where}{self.severity}: {self.message}"]
        if self.span and source is not None:
            # Lines as the lexer counts them ("\n" only), shown without invisible
            # characters (each becomes one '?', so the caret stays aligned).
            lines = source.split("\n")
            if 1 <= line <= len(lines):
                text = lines[line - 1].rstrip("\r").expandtabs(1)
                text = "".join(c if c.isprintable() else "?" for c in text)
                if len(text) > 200:  # keep the caret line readable for giant lines
                    start = max(0, col - 80)
                    text, col = text[start : start + 160], col - start
                width = 1
                if self.span.end_line == self.span.line:
                    width = max(1, self.span.end_column - self.span.column + 1)
                width = max(1, min(width, len(text) - col + 2))
                out.append("  " + text)
                out.append("  " + " " * (col - 1) + "^" * width)
        if self.expected:
            out.append(f"  expected: {self.expected}")
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def to_json(self) -> dict:
        return {
            "severity": self.severity,
            "message": self.message,
            "line": self.span.line if self.span else None,
            "column": self.span.column if self.span else None,
            "expected": self.expected,
            "hint": self.hint,
            "code": self.code,
        }


class PolicyError(Exception):
    """Bad input: the policy (or its source) cannot be used. Exit code 2 in the CLI."""

    def __init__(
        self,
        diagnostics: Diagnostic | Iterable[Diagnostic],
        source: str | None = None,
        filename: str = "<policy>",
    ):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = list(diagnostics)
        self.source = source
        self.filename = filename
        super().__init__(self.format())

    @classmethod
    def at(cls, message: str, span: Span | None = None, **kw) -> "PolicyError":
        source = kw.pop("source", None)
        filename = kw.pop("filename", "<policy>")
        return cls(Diagnostic(message, span, **kw), source=source, filename=filename)

    def with_source(self, source: str | None, filename: str) -> "PolicyError":
        self.source, self.filename = source, filename
        self.args = (self.format(),)
        return self

    def format(self) -> str:
        return "\n".join(d.format(self.source, self.filename) for d in self.diagnostics)

    @property
    def message(self) -> str:
        return self.diagnostics[0].message if self.diagnostics else ""


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a near-miss keyword, scorer or site, or None."""
    candidates = list(dict.fromkeys(candidates))
    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered and word not in candidates:  # KEEP -> keep
        return f"did you mean '{lowered[word.lower()]}'?"
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f"did you mean '{lowered[match[0]]}'?" if match else None
