"""LLaVA-NeXT (`llava_next`): LLaVA-1.5's towers with anyres crops and newline tokens."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .base import unsupported
from .llava import FAMILY as LLAVA


def anyres_layout(config, vc) -> dict[str, Any]:
    """Counts are for the largest pinpoint (ties: the first listed), the most tokens an
    image can take; each pinpoint side is a whole number of crops."""
    side = vc.image_size
    pinpoints = [tuple(p) for p in (getattr(config, "image_grid_pinpoints", None) or ())]
    if not pinpoints:
        raise unsupported("a llava_next config without image_grid_pinpoints",
                          expected="image_grid_pinpoints such as [[336, 672], [672, 336], [672, 672]]")
    height, width = max(pinpoints, key=lambda p: p[0] * p[1])
    if height % side or width % side:
        raise unsupported(f"pinpoint {height}x{width} is not a whole number of {side}-pixel crops")
    grid = (height // side, width // side)
    return {"anyres_grid": grid, "vit_crops": 1 + grid[0] * grid[1], "image_newline": True,
            "anyres_pinpoints": tuple(pinpoints)}


# LLaVA-1.5's paths, towers and language models; anyres on top
FAMILY = replace(
    LLAVA,
    model_type="llava_next",
    family="llava-next",
    config_class="LlavaNextConfig",
    model_class="LlavaNextForConditionalGeneration",
    # llava-hf/llava-v1.6-* checkpoints: the LLaVA-1.5 key layout plus the newline vector
    checkpoint_renames=((r"^image_newline$", "model.image_newline"),) + LLAVA.checkpoint_renames,
    layout=anyres_layout,
)
