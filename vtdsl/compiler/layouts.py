"""Plans for the image actually passed, on models whose visual token count depends on it.

A plan is checked for a model's reference image (docs/language.md, "Model families").
LLaVA-NeXT picks crops and unpads by the image's size, Qwen2.5-VL's patch grid is the
image's; a compiled model of either family reads each call's image sizes and runs the
policy as checked for that size: the same stages and sites, counts resolved for that many
tokens (a percentage of the actual count, the crops that image has).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..ir.plan import Plan
from ..lang.errors import PolicyError
from ..models.spec import ModelSpec
from .runtime import CompileError


def varies_with_image(spec: ModelSpec) -> bool:
    return spec.anyres_grid is not None or spec.dynamic_resolution


def image_layout(spec: ModelSpec, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) in pixels of the images of one call, from `image_sizes` (anyres) or
    `image_grid_thw` (dynamic resolution); None when the call carries neither. Images of
    different sizes in one call are refused: the LLM stages need one count per image."""
    sizes = kwargs.get("image_sizes")
    grid = kwargs.get("image_grid_thw")
    if isinstance(sizes, Tensor) and spec.anyres_grid is not None:
        pairs = {tuple(int(v) for v in row) for row in sizes.reshape(-1, 2).tolist()}
    elif isinstance(grid, Tensor) and spec.dynamic_resolution:
        rows = grid.reshape(-1, 3).tolist()
        if any(t != 1 for t, _, _ in rows):
            raise CompileError("vtdsl compiles image inputs only (image_grid_thw with t = 1), not video")
        pairs = {(h * spec.patch_size, w * spec.patch_size) for _, h, w in rows}
    else:
        return None
    if not pairs:
        return None
    if len(pairs) > 1:
        raise CompileError(f"a compiled {spec.name} takes images of one size per call (their visual token counts "
                           f"differ), got sizes {sorted(pairs)}; pass them in separate calls")
    return pairs.pop()


class PlanCache:
    """The plan of a compiled model for each image size seen (checked once per size)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.by_size: dict[tuple[int, int], Plan] = {}
        # the image size of the call in flight, recorded where the images are encoded
        # (generate() encodes them before prefill and does not pass their sizes on)
        self.current: tuple[int, int] | None = None

    def counts(self, kwargs: dict[str, Any]) -> tuple[int, int]:
        """(unpruned, compiled) image placeholders per image for one call."""
        plan = self.for_size(image_layout(self.plan.spec, kwargs) or self.current)
        return plan.spec.image_tokens, plan.image_placeholders

    def for_size(self, size: tuple[int, int] | None) -> Plan:
        if size is None or not varies_with_image(self.plan.spec):
            return self.plan
        plan = self.by_size.get(size)
        if plan is None:
            plan = self.by_size[size] = self._check(size)
        return plan

    def _check(self, size: tuple[int, int]) -> Plan:
        from ..ir import check

        height, width = size
        try:
            spec = self.plan.spec.for_image(height, width)
        except ValueError as err:
            raise CompileError(str(err)) from None
        try:
            return check(self.plan.policy, spec)
        except PolicyError as err:
            first = err.diagnostics[0]
            raise CompileError(f"the policy does not fit a {height}x{width} image on {spec.name} "
                               f"({spec.image_tokens} visual tokens): {first.message}") from None
