"""The `vtdsl` command line. Each command lives in its own module of this package.

Exit codes everywhere: 0 ok, 1 over budget or a failed check, 2 bad input.
"""

from __future__ import annotations

import click

from . import common


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vtdsl")
def main() -> None:
    """vtdsl: write, check and compile visual-token reduction policies.

    \b
    Example:
      vtdsl check policies/fastv.vt --model llava-1.5-7b
    """


def _register() -> None:
    from importlib import import_module

    for module in common.COMMAND_MODULES:
        mod = import_module(f"vtdsl.cli.{module}")
        for command in mod.COMMANDS:
            main.add_command(command)


_register()
