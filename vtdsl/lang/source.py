"""Reading policy files: size limit, encoding, and dispatch on the file's syntax."""

from __future__ import annotations

import os
from pathlib import Path

from . import ast
from .errors import Diagnostic, PolicyError
from .parser import MAX_SOURCE_BYTES, check_size

SYNTAXES = ("vt", "yaml")
_EXTENSIONS = {".vt": "vt", ".yaml": "yaml", ".yml": "yaml"}


def syntax_of(filename: str) -> str:
    """'vt' or 'yaml' from a file name; PolicyError for anything else."""
    ext = Path(filename).suffix.lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    raise PolicyError(
        Diagnostic(
            f"cannot tell the policy syntax of '{filename}' from its extension",
            None,
            expected="a file ending in .vt, .yaml or .yml",
            hint="name the file *.vt or *.yaml (the CLI also takes --from vt|yaml)",
            code="input",
        ),
        filename=filename,
    )


def decode(data: bytes, filename: str) -> str:
    """UTF-8 text of a policy file; a located PolicyError for anything that is not text."""
    check_size(data, filename)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        line_start = before.rfind(b"\n") + 1
        col = len(data[line_start : exc.start].decode("utf-8", "replace")) + 1
        shown = data.decode("utf-8", "replace")
        raise PolicyError(
            Diagnostic(
                f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} cannot be decoded)",
                ast.Span(line=line, column=col, end_line=line, end_column=col),
                hint="policies are plain UTF-8 text; is this the right file?",
                code="input",
            ),
            source=shown,
            filename=filename,
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise PolicyError(
            Diagnostic("the file looks binary (it contains NUL bytes)",
                       ast.Span(line=line, column=1, end_line=line, end_column=1),
                       hint="policies are plain UTF-8 text; is this the right file?", code="input"),
            filename=filename,
        )
    return text


def read_bytes(path: str | os.PathLike) -> bytes:
    """At most MAX_SOURCE_BYTES + 1 bytes of a file (enough to tell it is too large)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise PolicyError(
            Diagnostic(f"cannot read policy file: {exc.strerror or exc}", None, code="input"),
            filename=str(path),
        ) from None


def parse_text(text: str, filename: str = "<policy>", syntax: str = "vt") -> ast.Policy:
    if syntax == "yaml":
        from .yaml_form import from_yaml

        return from_yaml(text, filename)
    if syntax != "vt":
        raise ValueError(f"unknown policy syntax {syntax!r}; expected one of {SYNTAXES}")
    from .parser import parse

    return parse(text, filename)


def parse_file(path: str | os.PathLike, syntax: str | None = None) -> ast.Policy:
    """Parse a `.vt` or `.yaml`/`.yml` policy file (or `syntax` regardless of extension)."""
    filename = str(path)
    syntax = syntax or syntax_of(filename)
    text = decode(read_bytes(path), filename)
    return parse_text(text, filename, syntax)


def looks_like_path(text: str) -> bool:
    """A one-line string ending in a policy extension: no policy text ends that way, so it
    names a file (which may not exist: that is an error, not policy text)."""
    return "\n" not in text and len(text) < 4096 and text.endswith((".vt", ".yaml", ".yml"))


def load_policy(policy: ast.Policy | str | os.PathLike, filename: str = "<policy>"
                ) -> tuple[ast.Policy, str | None, str]:
    """The AST, source text (None for an AST) and filename of an AST, a path or policy text."""
    if isinstance(policy, ast.Policy):
        return policy, None, filename
    if isinstance(policy, os.PathLike) or looks_like_path(policy):
        filename = str(policy)
        text = decode(read_bytes(policy), filename)
        return parse_text(text, filename, syntax_of(filename)), text, filename
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a Policy, a path or source text, not {type(policy).__name__}")
    return parse_text(policy, filename), policy, filename
