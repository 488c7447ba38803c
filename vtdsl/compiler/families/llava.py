"""LLaVA-1.5 (`LlavaForConditionalGeneration`): tiny-llava, llava-1.5-7b/13b, the vtbench model."""

from __future__ import annotations

from .base import Family


class Llava(Family):
    """A CLIP encoder, one fixed-size image, a 2-layer projector and a Llama-style LLM.

    The plain layout is the base class's: the image's patches (CLS dropped or kept by the
    select strategy) reach the LLM in raster order on the patch grid, one RoPE stream.
    """

    name = "llava"


FAMILY = Llava()
