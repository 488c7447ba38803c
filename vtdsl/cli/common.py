"""Shared plumbing for CLI commands: exit codes, error printing, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from ..lang.errors import PolicyError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

# Command modules, in the order their commands appear in `vtdsl --help`.
COMMAND_MODULES = ("lang_cmds", "models_cmd", "check_cmd", "compile_cmd", "run_cmd", "eval_cmd", "search_cmd", "calibrate_cmd")


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))


def guarded(fn: Callable) -> Callable:
    """Turn every failure of a command into a located message and an exit code.

    A user must never see a Python traceback for bad input: PolicyError -> exit 2 with
    `file:line:col: error: ...` on stderr (and, under --json, the diagnostics as a JSON
    object on stdout); anything else unexpected -> exit 2 with one line.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PolicyError as err:
            click.echo(err.format(), err=True)
            if kwargs.get("as_json"):
                # a script reading --json output gets an object even for bad input
                emit_json({"ok": False, "error": err.message,
                           "diagnostics": [d.to_json() for d in err.diagnostics]})
            sys.exit(EXIT_BAD_INPUT)
        except click.exceptions.Exit:
            raise
        except (click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (OSError, ValueError, RecursionError, MemoryError) as err:
            click.echo(f"error: {type(err).__name__}: {err}", err=True)
            sys.exit(EXIT_BAD_INPUT)

    return wrapper
