"""Idefics3 (`Idefics3ForConditionalGeneration`): smolvlm-2.2b (HuggingFaceTB/SmolVLM-Instruct).

SmolVLM's layout (`smolvlm`: tiles plus a global view, pixel-shuffle connector, the LLM's
image tokens found by id between the tiles' text tokens) under Idefics3's classes.
"""

from __future__ import annotations

from .smolvlm import SmolVLM


class Idefics3(SmolVLM):
    """SmolVLM's tiles and pixel shuffle; no size argument."""

    name = "idefics3"


FAMILY = Idefics3()
