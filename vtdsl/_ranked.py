"""One rule for the extension tables (scorers, rest options, families): an entry is
registered once under its key, and the table stays in `rank` order whatever order the
package's modules were imported in (messages and listings read it in that order)."""

from __future__ import annotations

from typing import Any, TypeVar

Entry = TypeVar("Entry")


def add_ranked(table: dict[str, Any], key: str, entry: Entry, what: str) -> Entry:
    if key in table:
        raise ValueError(f"{what} '{key}' is registered twice")
    table[key] = entry
    ordered = sorted(table.items(), key=lambda item: item[1].rank)
    table.clear()
    table.update(ordered)
    return entry
