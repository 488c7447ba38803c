"""Idefics3 (`idefics3`): SmolVLM's architecture (HuggingFaceTB/SmolVLM-Instruct ships
under this model_type) with its own transformers classes and tower name."""

from __future__ import annotations

from dataclasses import replace

from .smolvlm import FAMILY as SMOLVLM

FAMILY = replace(
    SMOLVLM,
    model_type="idefics3",
    family="idefics3",
    config_class="Idefics3Config",
    model_class="Idefics3ForConditionalGeneration",
    # hub files saved before transformers renamed the vision config (SmolVLM-Instruct's)
    # name the tower `idefics3`
    vision_towers={name: SMOLVLM.vision_towers["smolvlm_vision"] for name in ("idefics3_vision", "idefics3")},
)
