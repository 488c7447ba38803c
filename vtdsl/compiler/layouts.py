"""Plans for the image actually passed, on models whose visual token count depends on it.

A plan is checked for a model's reference image (docs/language.md, "Model families").
LLaVA-NeXT picks crops and unpads by the image's size, Qwen2.5-VL's patch grid is the
image's; a compiled model of such a family (`Family.sized_per_image`) reads each call's
image sizes (`Family.image_sizes`) and runs the policy as checked for that size: the same
stages and sites, counts resolved for that many tokens (a percentage of the actual count,
the crops that image has).
"""

from __future__ import annotations

from typing import Any

from ..ir.plan import Plan
from ..lang.errors import PolicyError
from ..models.spec import ModelSpec
from .families import family_of
from .runtime import CompileError


class PlanCache:
    """The plan of a compiled model for each token layout seen (checked once per layout:
    images of different sizes often share one, e.g. the same anyres crops and unpadding)."""

    MAX_LAYOUTS = 256

    def __init__(self, plan: Plan):
        self.plan = plan
        self.family = family_of(plan.spec)
        self.by_layout: dict[tuple, Plan] = {}
        # the plan of the call in flight, set where the images are encoded (generate()
        # encodes them before prefill and does not pass their sizes on)
        self.current: Plan | None = None
        # the plan of the call's video (`Family.video_argument`), set where it is encoded;
        # the LLM runs it on a prompt whose visual placeholders are the video's
        self.video: Plan | None = None

    def for_call(self, kwargs: dict[str, Any]) -> Plan | None:
        """The plan for the images a call carries, or None when it names no sizes."""
        if not self.family.sized_per_image:
            return self.plan
        sizes = self.family.image_sizes(self.plan.spec, kwargs)
        return None if sizes is None else self.for_sizes(sizes)

    def for_sizes(self, sizes: list[tuple[int, int]]) -> Plan:
        specs = {}
        for height, width in dict.fromkeys(sizes):
            try:
                spec = self.family.sized_spec(self.plan.spec, height, width)
            except ValueError as err:
                raise CompileError(str(err)) from None
            specs.setdefault(self.family.layout_key(spec), (spec, (height, width)))
        if len(specs) > 1:
            counts = sorted({spec.image_tokens for spec, _ in specs.values()})
            raise CompileError(f"a compiled {self.plan.spec.name} takes images of one token layout per call; these "
                               f"sizes give {len(specs)} ({', '.join(map(str, counts))} visual tokens): "
                               f"{sorted(size for _, size in specs.values())}; pass them in separate calls")
        (key, (spec, size)), = specs.items()
        return self._cached(key, spec, size)

    def for_video(self, kwargs: dict[str, Any]) -> Plan | None:
        """The plan for the video a call carries (its frames' token layout), or None."""
        try:
            spec = self.family.video_spec(self.plan.spec, kwargs)
        except ValueError as err:
            raise CompileError(str(err)) from None
        if spec is None:
            return None
        return self._cached(("video", spec.vit_crops, *self.family.layout_key(spec)), spec, None)

    def _cached(self, key: tuple, spec: ModelSpec, size: tuple[int, int] | None) -> Plan:
        """The plan checked for `spec` (an image of `size`, or a video: None), once per layout."""
        plan = self.by_layout.get(key)
        if plan is None:
            if len(self.by_layout) >= self.MAX_LAYOUTS:
                self.by_layout.clear()
            plan = self.by_layout[key] = self._check(spec, size)
        return plan

    def counts(self, kwargs: dict[str, Any]) -> tuple[int, int]:
        """(unpruned, compiled) image placeholders per image for one call."""
        plan = self.for_call(kwargs) or self.current or self.plan
        return plan.spec.image_tokens, plan.image_placeholders

    def _check(self, spec: ModelSpec, size: tuple[int, int] | None) -> Plan:
        from ..ir import check

        if spec == self.plan.spec:
            return self.plan
        try:
            return check(self.plan.policy, spec)
        except PolicyError as err:
            first = err.diagnostics[0]
            where = f" (policy line {first.span.line}, column {first.span.column})" if first.span else ""
            if size is None:
                rows, cols = spec.grid
                groups = f"{spec.vit_crops} temporal group{'s' if spec.vit_crops > 1 else ''}"
                raise CompileError(f"the policy does not fit a video of {groups} of "
                                   f"{rows}x{cols} patches on {spec.name} ({spec.image_tokens} visual tokens): "
                                   f"{first.message}{where}") from None
            height, width = size
            raise CompileError(f"the policy does not fit a {height}x{width} image on {spec.name} "
                               f"({spec.image_tokens} visual tokens): {first.message}{where}") from None
