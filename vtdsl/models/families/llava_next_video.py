"""LLaVA-NeXT-Video (`llava_next_video`): LLaVA-NeXT's towers and anyres images, and video:
every frame at the tower's size, its feature grid average-pooled (stride 2: 24x24 -> 12x12
patches at 336 px) before the projector, the frames one after another, no newline token."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .base import unsupported
from .llava_next import FAMILY as LLAVA_NEXT
from .llava_next import anyres_layout


def next_video_layout(config, vc) -> dict[str, Any]:
    """LLaVA-NeXT's layout (counts for the largest pinpoint) plus the frames' pool: transformers
    5.24 modeling_llava_next_video.py `LlavaNextVideoPooler` (AvgPool2d / MaxPool2d of kernel
    and stride `spatial_pool_stride`, sides rounded down) runs before the projector in
    `get_video_features`; the processor counts (h/14)·(w/14)/4 tokens a frame."""
    mode = getattr(config, "spatial_pool_mode", "average")
    stride = getattr(config, "spatial_pool_stride", 2)
    if mode not in ("average", "max"):
        raise unsupported(f"spatial_pool_mode {mode!r}: a learned pool changes the projector's input",
                          expected="'average' or 'max'")
    if not isinstance(stride, int) or stride < 1:
        raise unsupported(f"spatial_pool_stride {stride!r}", expected="a positive integer")
    return {**anyres_layout(config, vc), "frame_pool": stride, "frame_pool_first": True}


# LLaVA-NeXT's paths, towers, language models and llava-hf key renames (the -hf video
# checkpoints share them; the average pool has no weights)
FAMILY = replace(
    LLAVA_NEXT,
    model_type="llava_next_video",
    family="llava-next-video",
    config_class="LlavaNextVideoConfig",
    model_class="LlavaNextVideoForConditionalGeneration",
    layout=next_video_layout,
)
