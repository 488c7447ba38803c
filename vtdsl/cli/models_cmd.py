"""`vtdsl models`: list the model registry."""

from __future__ import annotations

import click

from .common import emit_json, guarded


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, file_okay=False))
@guarded
def models(as_json: bool, paths: tuple[str, ...]) -> None:
    """List the models vtdsl knows: name, family, visual tokens, layers, parameters.

    Built-in models are architectures only (no weights are downloaded); give local model
    directories (with a transformers config.json) to list them too.

    \b
    Example:
      vtdsl models
      vtdsl models --json
      vtdsl models ./checkpoints/my-llava
    """
    from ..models import get_spec, list_specs

    specs = list_specs() + [get_spec(p) for p in paths]
    rows = [spec.summary() for spec in specs]
    if as_json:
        emit_json({"models": rows})
        return
    headers = ("name", "family", "visual tokens", "layers (vit/llm)", "params", "dtype")
    table = [
        (
            r["name"],
            r["family"],
            str(r["visual_tokens"]),
            f"{r['vit_layers']}/{r['llm_layers']}",
            _human(r["params"]),
            r["dtype"],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


COMMANDS = [models]
