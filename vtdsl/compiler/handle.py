"""The handle of a plan installed on a model (`vtdsl.compiler.compiled(model)`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from ..ir.plan import Plan
from .listing import Listing
from .runtime import ForwardLog

ATTR = "_vtdsl_compiled"  # the model instance attribute that holds the handle


@dataclasses.dataclass
class Compiled:
    """Handle of an installed plan: the plan, the listing, and how to undo it."""

    plan: Plan
    listing: Listing
    log: ForwardLog
    image_tokens: int  # placeholders per image the compiled model expects
    original_image_tokens: int
    _undo: list[Callable[[], None]] = dataclasses.field(default_factory=list, repr=False)
    _model: Any = dataclasses.field(default=None, repr=False)

    def remove(self) -> None:
        """Undo every rewrite, last first. Safe to call twice."""
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                errors.append(exc)
        if self._model is not None and self._model.__dict__.get(ATTR) is self:
            del self._model.__dict__[ATTR]
        self._model = None
        if errors:
            raise errors[0]


def compiled(model: nn.Module) -> Compiled | None:
    """The handle of the plan installed on `model`, or None."""
    return model.__dict__.get(ATTR)
