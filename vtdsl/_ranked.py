"""One rule for the extension tables (scorers, rest options, families): an entry is
registered once under its key, and the table stays in `rank` order whatever order the
package's modules were imported in (messages and listings read it in that order); tables
whose entries are module attributes (families) are read off the package's modules."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, TypeVar

Entry = TypeVar("Entry")


def add_ranked(table: dict[str, Any], key: str, entry: Entry, what: str) -> Entry:
    if key in table:
        raise ValueError(f"{what} '{key}' is registered twice")
    table[key] = entry
    ordered = sorted(table.items(), key=lambda item: item[1].rank)
    table.clear()
    table.update(ordered)
    return entry


def discover(path, package: str, key: Callable[[Any], str], what: str, attr: str = "FAMILY") -> dict[str, Any]:
    """`attr` of every module of `package` (found on `path`) but `base` and private ones,
    by `key`, in module-name order: a new module is picked up with no table to edit."""
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        entry = getattr(importlib.import_module(f"{package}.{info.name}"), attr)
        if key(entry) in found:
            raise ValueError(f"{what} '{key(entry)}' is claimed by two modules of {package}")
        found[key(entry)] = entry
    return found
