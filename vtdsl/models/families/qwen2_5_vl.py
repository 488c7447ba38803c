"""Qwen2.5-VL (`qwen2_5_vl`): Qwen2-VL's layout with window attention in the ViT (full
attention in a few blocks), RMSNorm and gated-SiLU MLPs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .base import unsupported
from .qwen2_vl import FAMILY as QWEN2_VL
from .qwen2_vl import merged_layout


def qwen_layout(config, vc) -> dict[str, Any]:
    """Qwen2-VL's layout (`merged_layout`) plus the attention windows, which must tile the
    reference image in whole merge units."""
    layout = merged_layout(config, vc, vc.hidden_size, vc.out_hidden_size)
    merge, height = vc.spatial_merge_size, layout["image_size"]
    window = vc.window_size // vc.patch_size
    if window % merge or (height // vc.patch_size) % window:
        raise unsupported(f"a {vc.window_size}-pixel attention window does not tile a {height}-pixel image")
    return {**layout, "vit_window": window * window, "vit_full_attention": tuple(vc.fullatt_block_indexes)}


FAMILY = replace(
    QWEN2_VL,
    model_type="qwen2_5_vl",
    family="qwen2.5-vl",
    config_class="Qwen2_5_VLConfig",
    model_class="Qwen2_5_VLForConditionalGeneration",
    layout=qwen_layout,
    vision_towers={"qwen2_5_vl_vision": {"has_cls": False, "mlp": "swiglu", "layers": "depth", "heads": "num_heads"}},
    text_models={"qwen2_5_vl_text": {"mlp": "swiglu"}},
)
