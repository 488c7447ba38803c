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
"belongs to 'keep'", the unknown-key errors and the space glue all follow the table. The
"what happens to the rest" options bring theirs from vtdsl/ops/rest/ (each option's
`yaml_keys`, `read_yaml`, `write_yaml`), added after `per` on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..ops import rest as rest_options
from . import ast
from .format import format_number, format_region

TOP_KEYS = ("policy", "model", "budget", "stages")
PLACEMENT = ("at", "every", "from", "to")
ACTIONS = ("keep", "merge", "pool", "drop")
RENUMBER = "renumber"
# `decode:` (policies only): a list of `{at: llm.layerN, attend: K}`, each a
# `during decode at llm.layerN attend top K` statement; the value of each key and its rule.
DECODE = "decode"
DECODE_KEYS: dict[str, str] = {"at": "site", "attend": "decode_count"}

# The grammar rule that reads the value of a placement or action key (None: a fixed word
# the reader checks itself); keep options carry their own.
_RULES: dict[str, str | None] = {"at": "site", "from": "site", "to": "site", "every": None,
                                 "keep": "terms", "merge": "merge_body", "pool": "grid", "drop": None}


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
    taken = {*PLACEMENT, *ACTIONS, RENUMBER} | {k.name for o in _KEEP_OPTIONS for k in o.keys}
    clashes = [k.name for k in option.keys if k.name in taken]
    if clashes:
        raise ValueError(f"YAML key {clashes[0]!r} of keep option {option.name!r} is already taken")
    _KEEP_OPTIONS.append(option)
    return option


_rest_loaded = False


def keep_options() -> tuple[KeepOption, ...]:
    """The table; the rest options' entries join it (after `per`) on first use, when
    their modules load."""
    global _rest_loaded
    if not _rest_loaded:
        _rest_loaded = True
        for option in rest_options.options().values():
            register_keep_option(_rest_entry(option))
    return tuple(_KEEP_OPTIONS)


def keep_keys() -> tuple[str, ...]:
    """Every key that belongs to 'keep', in table order."""
    return tuple(k.name for option in keep_options() for k in option.keys)


def stage_keys(variants: Mapping[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The keys of a stage; `variants` puts a placement key's other spellings (a space's
    `at?`) in its place."""
    variants = variants or {}
    placement = tuple(v for k in PLACEMENT for v in variants.get(k, (k,)))
    return placement + ACTIONS + keep_keys() + (RENUMBER,)


def key_rule(name: str) -> str | None:
    """The grammar rule of a key's value."""
    for option in keep_options():
        for key in option.keys:
            if key.name == name:
                return key.rule
    return _RULES[name]


def rest_listing(option: KeepOption) -> str:
    """'a', 'b' and 'c': the first keys of the rest options up to `option`."""
    names = [f"'{o.first}'" for o in keep_options() if o.rest]
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


PER = register_keep_option(KeepOption("per", (YamlKey("per", " per ", "region_body"),), _read_per, _write_per))


def _rest_entry(option) -> KeepOption:
    """The YAML keys of one "what happens to the rest" option (vtdsl.ops.rest): its reader
    builds `Keep.rest`, its writer the keys."""

    def read(reader, m: Mapping, fields: dict) -> None:
        reader.together(m, entry)
        if entry.present(m):
            reader.one_rest(m, entry)
            fields["rest"] = option.read_yaml(reader, m)

    def write(keep: ast.Keep, item: dict) -> None:
        if keep.rest is not None and keep.rest.kind == option.kind:
            option.write_yaml(keep.rest, item)

    entry = KeepOption(option.kind, option.yaml_keys, read, write, rest=True, together=option.yaml_together,
                       clash=option.yaml_clash)
    return entry
