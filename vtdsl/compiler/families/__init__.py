"""Model families: one module each, chosen once from `ModelSpec.family`.

A family owns what the compiler core must not guess from spec fields: module paths, how an
image becomes the LLM's visual tokens (crops, newline tokens, merger, position streams),
which forward argument carries each image's size, and the rewrites its layout needs
(`base.Family` lists the questions). Adding a family is one module here, one entry in
`FAMILIES`, and its specs (`vtdsl.models.registry`) and tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime import CompileError
from .base import Family
from .llava import Llava
from .llava_next import LlavaNext
from .qwen2_vl import Qwen2VL

if TYPE_CHECKING:  # pragma: no cover
    from ...models.spec import ModelSpec

FAMILIES: dict[str, Family] = {family.name: family for family in (Llava(), LlavaNext(), Qwen2VL())}

# Forward arguments that carry one size per image, of any family (`inputs.count_images`).
SIZE_ARGUMENTS: tuple[str, ...] = tuple(f.size_argument for f in FAMILIES.values() if f.size_argument)


def family_of(spec: ModelSpec) -> Family:
    """The family object for `spec` (by `spec.family`, which the registry sets)."""
    family = FAMILIES.get(spec.family)
    if family is None:
        raise CompileError(f"{spec.name} is a '{spec.family}' model, which vtdsl cannot compile; "
                           f"known families: {', '.join(FAMILIES)}")
    return family


__all__ = ["FAMILIES", "Family", "SIZE_ARGUMENTS", "family_of"]
