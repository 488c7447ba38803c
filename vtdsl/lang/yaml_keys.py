"""The key table of the YAML form, read by both policies (`yaml_form`) and spaces
(`search.space`).

A stage is a placement (`at`, or a schedule `every` / `from` / `to`), one action, the
keys of the keep options, and `renumber`. Each keep option is one `KeepOption` entry:

- its `keys`, in the order they are read and written, each with the `.vt` words it stands
  for (a space glues those words around the value, holes included) and the grammar rule
  that reads its value (a policy parses it with that rule);
- `read`: fills the `ast.Keep` fields from the keys present (the policy reader, with its
  located errors);
- `write`: the keys of a `Keep` (`to_yaml`);
- `rest`: it is one way of handling the tokens a keep leaves (only one per keep).

A new option adds its entry with `register_keep_option`; the stage key list, the checks
"belongs to 'keep'", the unknown-key errors and the space glue all follow the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import ast
from .format import format_number, format_region

TOP_KEYS = ("policy", "model", "budget", "stages")
PLACEMENT = ("at", "every", "from", "to")
ACTIONS = ("keep", "merge", "pool", "drop")
RENUMBER = "renumber"

# The grammar rule that reads the value of a placement or action key (None: a fixed word
# the reader checks itself); keep options carry their own.
_RULES: dict[str, str | None] = {"at": "site", "from": "site", "to": "site", "every": None,
                                 "keep": "terms", "merge": "quantity", "pool": "grid", "drop": None}


@dataclass(frozen=True)
class YamlKey:
    """One key of a keep option: its value is the `.vt` text between `phrase` and `after`."""

    name: str
    phrase: str
    rule: str | None  # None: a fixed word, checked by the option's `read`
    after: str = ""

    @property
    def what(self) -> str:
        """How messages name the key's value."""
        return f"'{self.name}'"


# read(reader, mapping of the stage's keys, fields of the Keep being built)
Reader = Callable[[Any, Mapping, dict], None]
Writer = Callable[[ast.Keep, dict], None]


@dataclass(frozen=True)
class KeepOption:
    """One optional piece of a keep stage, as YAML keys (see the module docstring)."""

    name: str
    keys: tuple[YamlKey, ...]
    read: Reader
    write: Writer
    rest: bool = False
    # the keys go together; the `expected` line when one of them is missing
    together: str | None = None
    # (message, expected) when this rest option meets an earlier one; default: the generic
    # "a keep takes one of ..." listing the rest options so far
    clash: tuple[str, str] | None = None

    def present(self, keys: Mapping) -> bool:
        return any(k.name in keys for k in self.keys)

    @property
    def first(self) -> str:
        return self.keys[0].name


_KEEP_OPTIONS: list[KeepOption] = []


def register_keep_option(option: KeepOption) -> KeepOption:
    """Add a keep option's YAML keys (after those registered before it)."""
    taken = set(stage_keys())
    clashes = [k.name for k in option.keys if k.name in taken]
    if clashes:
        raise ValueError(f"YAML key {clashes[0]!r} of keep option {option.name!r} is already taken")
    _KEEP_OPTIONS.append(option)
    return option


def keep_options() -> tuple[KeepOption, ...]:
    return tuple(_KEEP_OPTIONS)


def keep_keys() -> tuple[str, ...]:
    """Every key that belongs to 'keep', in table order."""
    return tuple(k.name for option in _KEEP_OPTIONS for k in option.keys)


def stage_keys(variants: Mapping[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The keys of a stage; `variants` puts a placement key's other spellings (a space's
    `at?`) in its place."""
    variants = variants or {}
    placement = tuple(v for k in PLACEMENT for v in variants.get(k, (k,)))
    return placement + ACTIONS + keep_keys() + (RENUMBER,)


def key_rule(name: str) -> str | None:
    """The grammar rule of a key's value."""
    for option in _KEEP_OPTIONS:
        for key in option.keys:
            if key.name == name:
                return key.rule
    return _RULES[name]


def rest_listing(option: KeepOption) -> str:
    """'a', 'b' and 'c': the first keys of the rest options up to `option`."""
    names = [f"'{o.first}'" for o in _KEEP_OPTIONS if o.rest]
    names = names[: names.index(f"'{option.first}'") + 1]
    return ", ".join(names[:-1]) + " and " + names[-1]


def quantity_data(q: ast.Quantity) -> int | str:
    """A quantity as a YAML value: a whole number, or a percentage string."""
    if q.percent:
        return format_number(q.value) + "%"
    return int(q.value)


# ---------------------------------------------------------------------------------------
# The built-in keep options, in the order the keys have always been read and written


def _read_per(reader, m: Mapping, fields: dict) -> None:
    fields["region"] = reader.key_value(m, "per") if "per" in m else None


def _write_per(keep: ast.Keep, item: dict) -> None:
    if keep.region is not None:
        item["per"] = format_region(keep.region)


def _read_rest(reader, m: Mapping, fields: dict) -> None:
    if "merge_rest_into" in m and "add_rest_into" in m:
        raise reader.fail("a keep either merges or adds the rest, not both", m["add_rest_into"][0],
                          expected="one of merge_rest_into or add_rest_into")
    merge_rest = reader.key_value(m, "merge_rest_into") if "merge_rest_into" in m else None
    added = "add_rest_into" in m
    if added:
        merge_rest = reader.key_value(m, "add_rest_into")
    by = "tokens"
    if "merge_by" in m:
        key, val = m["merge_by"]
        if merge_rest is None:
            raise reader.fail("'merge_by' belongs to merge_rest_into or add_rest_into", key,
                              expected="merge_rest_into: N beside it")
        if not reader.is_word(val, "keys"):
            raise reader.fail("'merge_by' takes 'keys'", val, expected="merge_by: keys")
        by = "keys"
    fields.update(merge_rest=merge_rest, merge_added=added, merge_by=by)


def _write_rest(keep: ast.Keep, item: dict) -> None:
    if keep.merge_rest is not None:
        item["add_rest_into" if keep.merge_added else "merge_rest_into"] = quantity_data(keep.merge_rest)
        if keep.merge_by == "keys":
            item["merge_by"] = "keys"


def _read_recycle(reader, m: Mapping, fields: dict) -> None:
    reader.together(m, RECYCLE)
    fields["recycle"] = None
    if "recycle" in m:
        reader.one_rest(m, RECYCLE)
        count, clusters = reader.key_value(m, "recycle"), reader.key_value(m, "recycle_into")
        fields["recycle"] = reader.node(ast.Recycle, reader.join(m["recycle"][0], m["recycle_into"][1]),
                                        count=count, clusters=clusters)


def _write_recycle(keep: ast.Keep, item: dict) -> None:
    if keep.recycle is not None:
        item["recycle"] = quantity_data(keep.recycle.count)
        item["recycle_into"] = quantity_data(keep.recycle.clusters)


def _read_absorb(reader, m: Mapping, fields: dict) -> None:
    fields["absorb"] = reader.key_value(m, "absorb") if "absorb" in m else None
    if fields["absorb"] is not None:
        reader.one_rest(m, ABSORB)


def _write_absorb(keep: ast.Keep, item: dict) -> None:
    if keep.absorb is not None:
        item["absorb"] = quantity_data(keep.absorb)


def _read_cells(reader, m: Mapping, fields: dict) -> None:
    fields["cells"] = None
    if "recycle_cells" in m:
        reader.one_rest(m, CELLS)
        rows, cols = reader.key_value(m, "recycle_cells")
        fields["cells"] = reader.node(ast.Cells, reader.join(m["recycle_cells"][0], m["recycle_cells"][1]),
                                      rows=rows, cols=cols)


def _write_cells(keep: ast.Keep, item: dict) -> None:
    if keep.cells is not None:
        item["recycle_cells"] = f"{keep.cells.rows}x{keep.cells.cols}"


PER = register_keep_option(KeepOption("per", (YamlKey("per", " per ", "region_body"),), _read_per, _write_per))
REST = register_keep_option(KeepOption(
    "merge rest",
    (YamlKey("merge_rest_into", " then merge rest into ", "quantity"),
     YamlKey("add_rest_into", " then add rest into ", "quantity"),
     YamlKey("merge_by", " by ", None)),
    _read_rest, _write_rest, rest=True))
RECYCLE = register_keep_option(KeepOption(
    "recycle",
    (YamlKey("recycle", " then recycle ", "quantity"), YamlKey("recycle_into", " into ", "quantity")),
    _read_recycle, _write_recycle, rest=True,
    together="recycle: N and recycle_into: M (`then recycle N into M`)",
    clash=("a keep either merges the rest or recycles some of it, not both", "one of merge_rest_into or recycle")))
ABSORB = register_keep_option(KeepOption(
    "absorb", (YamlKey("absorb", " then absorb ", "quantity"),), _read_absorb, _write_absorb, rest=True))
CELLS = register_keep_option(KeepOption(
    "recycle cells", (YamlKey("recycle_cells", " then recycle rest into ", "grid", after=" cells"),),
    _read_cells, _write_cells, rest=True))
