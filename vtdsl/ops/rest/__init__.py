"""The "what happens to the rest" options of a `keep` stage, one module each.

`options()` is the table (kind -> `RestOption`, in rank order): it loads every module of
this package once, on first use, each registering its option (`base.register`). So a new
option is one new module; nothing else names one. See `base` for what an option declares.

Loading on first use, not at import: the modules' AST nodes subclass `vtdsl.lang.ast.Rest`,
and the front end imports this package while it is itself being imported.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from .base import MissingInput, RestContext, RestOption, RestPlan, register, table

__all__ = ["MissingInput", "RestContext", "RestOption", "RestPlan", "by_node", "by_rule", "options",
           "read_legacy", "register", "validate"]


@functools.cache
def _load() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


def options() -> dict[str, RestOption]:
    """Every option by kind, in rank order."""
    _load()
    return table()


def by_node(node) -> RestOption:
    """The option an AST node (an `ast.Rest`) belongs to."""
    return options()[node.kind]


def by_rule(rule: str) -> RestOption:
    """The option whose grammar rule built a parse tree."""
    return next(o for o in options().values() if o.rule == rule)


@functools.cache
def _adapter(kinds: tuple[str, ...]):
    from typing import Annotated, Union

    from pydantic import Field, TypeAdapter

    models = tuple(options()[k].model for k in kinds)
    union = models[0] if len(models) == 1 else Annotated[Union[models], Field(discriminator="kind")]
    return TypeAdapter(union)


def validate(data):
    """`Keep.rest` from its JSON data: the discriminated union (by `kind`) of the options'
    nodes."""
    return _adapter(tuple(options())).validate_python(data)


def read_legacy(data: dict) -> dict:
    """A keep's JSON data with the per-option fields older versions wrote (`merge_rest`,
    `recycle`, ...) turned into `rest`."""
    data = dict(data)
    found = [r for r in (o.legacy(data) for o in options().values()) if r is not None]
    if len(found) > 1:
        names = [o.phrase for o in options().values()]
        raise ValueError(f"a keep takes one of {', '.join(names[:-1])} and {names[-1]}")
    data["rest"] = found[0] if found else None
    return data
