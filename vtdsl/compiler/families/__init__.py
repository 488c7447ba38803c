"""Model families: one module each, found with `pkgutil`, chosen once from `ModelSpec.family`.

A family owns what the compiler core must not guess from spec fields: module paths, how an
image becomes the LLM's visual tokens (crops, newline tokens, merger, position streams),
which forward argument carries each image's size, and the rewrites its layout needs
(`base.Family` lists the questions). Each module here (`base` aside) exposes `FAMILY`, its
`Family` instance; nothing lists them by hand. Adding a family is that module, its spec
rules in `vtdsl.models.families` (one module there too), and its tests
(docs/dev/extending.md, "Add a model family").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._ranked import discover as discover_entries
from ..runtime import CompileError
from .base import Family

if TYPE_CHECKING:  # pragma: no cover
    from ...models.spec import ModelSpec


def discover(path=__path__, package: str = __name__) -> dict[str, Family]:
    """The `FAMILY` of each module of `package` (on `path`) but `base`, by its `name`."""
    return discover_entries(path, package, key=lambda family: family.name, what="family")


# ModelSpec.family -> its family object, in module-name order
FAMILIES: dict[str, Family] = discover()

# Forward arguments that carry one size per image, of any family (`inputs.count_images`).
SIZE_ARGUMENTS: tuple[str, ...] = tuple(dict.fromkeys(f.size_argument for f in FAMILIES.values() if f.size_argument))


def family_of(spec: ModelSpec) -> Family:
    """The family object for `spec` (by `spec.family`, which the registry sets)."""
    family = FAMILIES.get(spec.family)
    if family is None:
        raise CompileError(f"{spec.name} is a '{spec.family}' model, which vtdsl cannot compile; "
                           f"known families: {', '.join(FAMILIES)}")
    return family


__all__ = ["FAMILIES", "discover", "Family", "SIZE_ARGUMENTS", "family_of"]
