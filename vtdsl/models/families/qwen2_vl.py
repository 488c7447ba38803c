"""Qwen2-VL (`qwen2_vl`): a full-attention ViT with 2-D rotary positions, a 2x2 patch
merger, and a Qwen2 LLM with M-RoPE; dynamic resolution (Qwen2.5-VL builds on it)."""

from __future__ import annotations

from typing import Any

from .base import ModelFamily, unsupported

# transformers' Qwen2VLImageProcessor defaults (size shortest_edge / longest_edge), what a
# checkpoint without a preprocessor_config.json gets
DEFAULT_PIXELS = (56 * 56, 28 * 28 * 1280)
# transformers' Qwen2VLVideoProcessor defaults (size shortest_edge / longest_edge): videos
# get their own, smaller, per-frame range (no total-video cap: its `cap_pixels_per_frame`
# is off unless asked for)
DEFAULT_VIDEO_PIXELS = (128 * 28 * 28, 28 * 28 * 768)

# Qwen/Qwen2-VL-* and Qwen/Qwen2.5-VL-* hub checkpoints: `visual.*`, `model.*` (text),
# `lm_head.*`; transformers 5 nests both under `model.`.
QWEN_RENAMES = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!visual\.|language_model\.)", "model.language_model."),
)


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


def merged_layout(config, vc, width: int, out: int) -> dict[str, Any]:
    """The layout both Qwen-VL generations share. Counts are for `vtdsl_reference_image`
    (a key vtdsl adds to the config; 672x672 when absent); features are the last block's
    output (`width` wide), merged 2x2 by the merger (the projector here, to `out`)."""
    height, side = tuple(getattr(config, "vtdsl_reference_image", None) or (672, 672))
    merge = vc.spatial_merge_size
    unit = vc.patch_size * merge
    if height != side or height % unit:
        raise unsupported(f"reference image {height}x{side}: vtdsl needs a square side that is a multiple of "
                          f"{unit} pixels (patch {vc.patch_size} x merge {merge})")
    wide = width * merge * merge
    low, high = pixel_range(config)
    return {
        "image_size": height,
        "channels": vc.in_channels,
        "vision_feature_layer": -1,
        "select_strategy": "default",
        "projector": (wide, wide, out),
        "spatial_merge": merge,
        "temporal_patch": vc.temporal_patch_size,
        "position_encoding": "mrope",
        "dynamic_resolution": True,
        "min_pixels": low,
        "max_pixels": high,
        "video_min_pixels": DEFAULT_VIDEO_PIXELS[0],
        "video_max_pixels": DEFAULT_VIDEO_PIXELS[1],
    }


def qwen2_vl_layout(config, vc) -> dict[str, Any]:
    """Every ViT block attends over the whole image; the vision config's `hidden_size`
    is the merger's output width (the LLM's), `embed_dim` the tower's."""
    return merged_layout(config, vc, vc.embed_dim, vc.hidden_size)


FAMILY = ModelFamily(
    model_type="qwen2_vl", family="qwen2-vl",
    config_class="Qwen2VLConfig", model_class="Qwen2VLForConditionalGeneration",
    vit_layer_path="model.visual.blocks.{i}", projector_path="model.visual.merger",
    llm_layer_path="model.language_model.layers.{i}",
    checkpoint_renames=QWEN_RENAMES, layout=qwen2_vl_layout,
    # LayerNorm blocks with a fc1 / QuickGELU / fc2 MLP of embed_dim * mlp_ratio
    vision_towers={"qwen2_vl_vision": {"has_cls": False, "mlp": "gelu", "layers": "depth", "heads": "num_heads",
                                       "hidden": "embed_dim", "ffn": lambda vc: vc.embed_dim * vc.mlp_ratio}},
    text_models={"qwen2_vl_text": {"mlp": "swiglu"}},
)
