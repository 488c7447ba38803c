"""`vtdsl parse` and `vtdsl fmt`: the language front end on the command line.

Neither command imports torch (nor anything outside vtdsl.lang), so both start fast.
"""

from __future__ import annotations

import difflib
import os
import sys
import tempfile

import click

from ..lang import ast
from ..lang.format import (
    format_budget_body,
    format_number,
    format_policy,
    format_quantity,
    format_score,
    format_source,
)
from ..lang.parser import MAX_SOURCE_BYTES
from ..lang.source import decode, parse_text, read_bytes, syntax_of
from ..lang.yaml_form import to_yaml
from .common import EXIT_FAILED, emit_json, guarded

_SYNTAX = click.Choice(["vt", "yaml"])


def read_policy_source(file: str, syntax: str | None) -> tuple[str, str, str]:
    """(text, filename, syntax) of FILE, or of stdin for '-' (.vt unless --from says)."""
    if file == "-":
        data = sys.stdin.buffer.read(MAX_SOURCE_BYTES + 1)
        filename = "<stdin>"
        syntax = syntax or "vt"
    else:
        filename = file
        syntax = syntax or syntax_of(file)
        data = read_bytes(file)
    return decode(data, filename), filename, syntax


# ---------------------------------------------------------------------------------------
# vtdsl parse


def _loc(node: ast.Node) -> str:
    s = node.span
    return f"  ({s.line}:{s.column})" if s is not None else ""


def render_tree(policy: ast.Policy) -> str:
    """A readable, indented view of the AST with each node's line:column."""
    out: list[str] = []

    def leaf(node) -> str | None:
        if isinstance(node, ast.Site):
            return node.text()
        if isinstance(node, ast.Quantity):
            return format_quantity(node)
        if isinstance(node, ast.ScoreRef):
            return format_score(node)
        if isinstance(node, ast.Budget):
            return f"budget {format_budget_body(node)}"
        return None

    def walk(node: ast.Node, indent: int, label: str) -> None:
        pad = "  " * indent
        short = leaf(node)
        if short is not None:
            out.append(f"{pad}{label}{short}{_loc(node)}")
            return
        out.append(f"{pad}{label}{type(node).__name__}{_loc(node)}")
        for name, value in node:
            if name == "span" or value is None or value == []:
                continue
            if name == "kind" and not isinstance(node, (ast.SelectTerm, ast.Region)):
                continue  # the node's class already says it
            if isinstance(value, ast.Node):
                walk(value, indent + 1, f"{name}: ")
            elif isinstance(value, list) and value and isinstance(value[0], ast.Node):
                out.append(f"{pad}  {name}:")
                for i, item in enumerate(value):
                    walk(item, indent + 2, f"[{i}] ")
            elif isinstance(value, str) and name in ("name", "model"):
                out.append(f'{pad}  {name}: "{value}"')
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append(f"{pad}  {name}: {format_number(value)}")
            else:
                out.append(f"{pad}  {name}: {value}")

    walk(policy, 0, "")
    return "\n".join(out)


@click.command("parse")
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the AST as JSON, source spans included.")
@click.option("--from", "syntax", type=_SYNTAX, default=None,
              help="Syntax of FILE (default: from its extension; stdin is .vt).")
@guarded
def parse(file: str, as_json: bool, syntax: str | None) -> None:
    """Parse a policy (.vt or .yaml; '-' reads stdin) and print its AST.

    Exits 0 for a valid policy and 2 with located errors for bad input.

    \b
    Examples:
      vtdsl parse examples/design.vt
      vtdsl parse examples/design.vt --json
      echo 'at llm.layer2 keep diverse 64' | vtdsl parse -
    """
    text, filename, syntax = read_policy_source(file, syntax)
    policy = parse_text(text, filename, syntax)
    if as_json:
        emit_json(policy.model_dump(mode="json"))
    else:
        click.echo(render_tree(policy))


# ---------------------------------------------------------------------------------------
# vtdsl fmt


def _write_atomically(path: str, text: str) -> None:
    # Through a symlink to its target: replacing the link itself would leave the real file
    # unformatted and the link turned into a copy.
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".vtdsl-fmt-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@click.command("fmt")
@click.argument("files", metavar="FILE...", nargs=-1, required=True)
@click.option("--check", is_flag=True, help="Print nothing new; exit 1 if a FILE is not in canonical form.")
@click.option("--to", "target", type=_SYNTAX, default=None,
              help="Output syntax (default: the syntax of FILE).")
@click.option("--in-place", "-i", "in_place", is_flag=True, help="Rewrite each FILE in canonical form.")
@click.option("--from", "syntax", type=_SYNTAX, default=None,
              help="Syntax of FILE (default: from its extension; stdin is .vt).")
@guarded
def fmt(files: tuple[str, ...], check: bool, target: str | None, in_place: bool, syntax: str | None) -> None:
    """Print a policy in canonical form ('-' reads stdin); check or rewrite many.

    The .vt form keeps comments; the YAML form has none. With --check, exit 1 (and show a
    diff) when a FILE is not canonical; with --in-place, rewrite them. Printing takes one
    FILE. Bad input exits 2 (every file is read before any is rewritten).

    \b
    Examples:
      vtdsl fmt examples/design.vt
      vtdsl fmt --check policies/*.vt
      vtdsl fmt examples/design.vt --to yaml > design.yaml
      vtdsl fmt --in-place policy.vt other.vt
    """
    if check and in_place:
        raise click.UsageError("--check and --in-place exclude each other")
    if len(files) > 1 and not (check or in_place):
        raise click.UsageError("printing takes one FILE; use --check or --in-place for several")
    if in_place and "-" in files:
        raise click.UsageError("--in-place needs files, not stdin")
    results = []  # all parsed first: a bad file leaves every file untouched
    for file in files:
        text, filename, file_syntax = read_policy_source(file, syntax)
        out_syntax = target or file_syntax
        if in_place and out_syntax != file_syntax:
            raise click.UsageError(f"--in-place keeps the file's syntax ({file_syntax}); drop --to {out_syntax} "
                                   f"or redirect the output to a new file")
        if out_syntax == "vt":
            canonical = (format_source(text, filename) if file_syntax == "vt"
                         else format_policy(parse_text(text, filename, file_syntax)))
        else:
            canonical = to_yaml(parse_text(text, filename, file_syntax))
        results.append((file, filename, text, canonical))
    if check:
        stale = False
        for file, filename, text, canonical in results:
            if canonical != text:
                diff = difflib.unified_diff(text.splitlines(keepends=True), canonical.splitlines(keepends=True),
                                            fromfile=filename, tofile=f"{filename} (canonical)")
                click.echo("".join(diff), nl=False)
                click.echo(f"{filename}: not in canonical form (run: vtdsl fmt --in-place {file})", err=True)
                stale = True
        if stale:
            sys.exit(EXIT_FAILED)
        return
    if in_place:
        for file, filename, text, canonical in results:
            if canonical != text:
                _write_atomically(file, canonical)
                click.echo(f"reformatted {filename}", err=True)
        return
    click.echo(results[0][3], nl=False)


COMMANDS = [parse, fmt]
