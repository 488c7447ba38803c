"""Qwen2.5-VL (`qwen2_5_vl`): window-attention ViT, 2x2 merger, Qwen2 LLM with M-RoPE."""

from __future__ import annotations

from typing import Any

from .base import ModelFamily, unsupported


# transformers' Qwen2VLImageProcessor defaults (size shortest_edge / longest_edge), what a
# checkpoint without a preprocessor_config.json gets
DEFAULT_PIXELS = (56 * 56, 28 * 28 * 1280)


def pixel_range(config) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the model's image processor: its
    preprocessor_config.json as the registry attached it (`vtdsl_preprocessor`;
    `min_pixels` / `max_pixels` override `size`, as in the processor), else transformers'
    defaults."""
    pre = getattr(config, "vtdsl_preprocessor", None) or {}
    size = pre.get("size") or {}
    low = pre.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or DEFAULT_PIXELS[0]
    high = pre.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or DEFAULT_PIXELS[1]
    if not (isinstance(low, int) and isinstance(high, int) and 0 < low <= high):
        raise unsupported(f"image processor pixel range [{low}, {high}]",
                          expected="integers 0 < min_pixels <= max_pixels")
    return low, high


def qwen_layout(config, vc) -> dict[str, Any]:
    """Dynamic resolution, so counts are for `vtdsl_reference_image` (a key vtdsl adds to
    the config; 672x672 when absent); features are the last block's output, merged 2x2 by
    the merger, which is the projector here."""
    height, width = tuple(getattr(config, "vtdsl_reference_image", None) or (672, 672))
    merge = vc.spatial_merge_size
    unit = vc.patch_size * merge
    if height != width or height % unit:
        raise unsupported(f"reference image {height}x{width}: vtdsl needs a square side that is a multiple of "
                          f"{unit} pixels (patch {vc.patch_size} x merge {merge})")
    window = vc.window_size // vc.patch_size
    if window % merge or (height // vc.patch_size) % window:
        raise unsupported(f"a {vc.window_size}-pixel attention window does not tile a {height}-pixel image")
    wide = vc.hidden_size * merge * merge
    low, high = pixel_range(config)
    return {
        "min_pixels": low,
        "max_pixels": high,
        "image_size": height,
        "channels": vc.in_channels,
        "vision_feature_layer": -1,
        "select_strategy": "default",
        "projector": (wide, wide, vc.out_hidden_size),
        "spatial_merge": merge,
        "temporal_patch": vc.temporal_patch_size,
        "vit_window": window * window,
        "vit_full_attention": tuple(vc.fullatt_block_indexes),
        "position_encoding": "mrope",
        "dynamic_resolution": True,
    }


FAMILY = ModelFamily(
    model_type="qwen2_5_vl",
    family="qwen2.5-vl",
    config_class="Qwen2_5_VLConfig",
    model_class="Qwen2_5_VLForConditionalGeneration",
    vit_layer_path="model.visual.blocks.{i}",
    projector_path="model.visual.merger",
    llm_layer_path="model.language_model.layers.{i}",
    # Qwen/Qwen2.5-VL-* hub checkpoints: `visual.*`, `model.*` (text), `lm_head.*`.
    checkpoint_renames=(
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!visual\.|language_model\.)", "model.language_model."),
    ),
    layout=qwen_layout,
    vision_towers={"qwen2_5_vl_vision": {"has_cls": False, "mlp": "swiglu", "layers": "depth", "heads": "num_heads"}},
    text_models={"qwen2_5_vl_text": {"mlp": "swiglu"}},
)
