"""Model families' spec rules, one module each, found with `pkgutil`.

Each module (`base` aside) exposes `FAMILY`, a `ModelFamily` for one transformers
`model_type`: config and model classes, module paths, checkpoint renames, the token layout
and the vision towers / language models it accepts. The registry reads these tables and
never names a family; adding one is a module here (and its compiler module,
`vtdsl.compiler.families`). This package must not import the compiler.
"""

from __future__ import annotations

from typing import Any

from ..._ranked import discover as discover_entries
from .base import ModelFamily, unsupported


def discover(path=__path__, package: str = __name__) -> dict[str, ModelFamily]:
    """The `FAMILY` of each module of `package` (on `path`) but `base`, by its `model_type`."""
    return discover_entries(path, package, key=lambda family: family.model_type, what="model_type")


# model_type -> its family's rules
FAMILIES: dict[str, ModelFamily] = discover()


def _union(part: str) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for family in FAMILIES.values():
        merged.update(getattr(family, part))
    return merged


# vision / text model_type -> its row, whichever family brought it
VISION_TOWERS: dict[str, dict[str, Any]] = _union("vision_towers")
TEXT_MODELS: dict[str, dict[str, Any]] = _union("text_models")

__all__ = ["FAMILIES", "discover", "TEXT_MODELS", "VISION_TOWERS", "ModelFamily", "unsupported"]
