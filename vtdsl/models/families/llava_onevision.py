"""LLaVA-OneVision (`llava_onevision`): a SigLIP tower (no CLS token), LLaVA-NeXT's anyres
crops, unpadding and newline tokens, the unpadded map shrunk under "anyres_max_N", a
2-layer projector and a Qwen2 LLM. Video: every frame at the tower's size, its projected
features resized bilinearly to half the grid's sides (rounded up), the frames one after
another and one newline token after the last."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from .base import unsupported
from .llava_next import FAMILY as LLAVA_NEXT
from .llava_next import anyres_layout


def onevision_layout(config, vc) -> dict[str, Any]:
    """LLaVA-NeXT's layout (counts for the largest pinpoint) plus the cap on the unpadded
    map that `vision_aspect_ratio` ("anyres_max_N") sets."""
    ratio = getattr(config, "vision_aspect_ratio", None) or "anyres_max_9"
    match = re.fullmatch(r"anyres_max_([1-9][0-9]*)", str(ratio))
    if match is None:
        raise unsupported(f"vision_aspect_ratio {ratio!r}", expected="anyres_max_N, such as anyres_max_9")
    # transformers 5.24 modeling_llava_onevision.py `get_video_features` / `apply_pooling`
    # (ceil(side / 2) by bilinear interpolation, after the projector; the newline appended
    # once per video), as the processor counts it (frames x 14² + 1 at 384 px)
    return {**anyres_layout(config, vc), "anyres_max_crops": int(match.group(1)),
            "frame_pool": 2, "frame_pool_ceil": True, "video_newline": True}


# SigLIP layers have CLIP's layout (q/k/v/out_proj, layer_norm1/2, fc1/fc2; tanh GELU)
_SIGLIP = {"siglip_vision_model": {"has_cls": False, "mlp": "gelu", "layers": "num_hidden_layers",
                                   "heads": "num_attention_heads"}}

# LLaVA-NeXT's module paths and llava-hf key renames (the OneVision -hf checkpoints share
# that layout: language_model.model.*, vision_tower.vision_model.*, image_newline)
FAMILY = replace(
    LLAVA_NEXT,
    model_type="llava_onevision",
    family="llava-onevision",
    config_class="LlavaOnevisionConfig",
    model_class="LlavaOnevisionForConditionalGeneration",
    layout=onevision_layout,
    vision_towers=_SIGLIP,
    text_models={"qwen2": {"mlp": "swiglu"}},
)
