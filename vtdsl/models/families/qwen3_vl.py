"""Qwen3-VL (`qwen3_vl`): Qwen2-VL's dynamic-resolution layout on 16-pixel patches (a 2x2
merge unit is 32 pixels), a full-attention LayerNorm ViT with learned (interpolated) and
2-D rotary positions, a Qwen3 LLM (per-head q/k norms) with interleaved M-RoPE, and
DeepStack: the outputs of a few ViT layers pass through their own mergers and are added to
the visual tokens' hidden states after the first LLM layers."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .base import unsupported
from .qwen2_vl import FAMILY as QWEN2_VL
from .qwen2_vl import merged_layout


def qwen3_layout(config, vc) -> dict[str, Any]:
    """Qwen2-VL's layout (`merged_layout`: the last block's output merged 2x2 to the LLM's
    width) plus the DeepStack layers. Videos are not counted: Qwen3-VL's video processor
    spends one pixel budget on all frames and interleaves timestamps, which `for_video`
    does not model, so the video range stays 0 (`for_video` then refuses)."""
    layout = merged_layout(config, vc, vc.hidden_size, vc.out_hidden_size)
    deepstack = tuple(vc.deepstack_visual_indexes or ())
    if any(not 0 <= i < vc.depth for i in deepstack) or len(set(deepstack)) != len(deepstack):
        raise unsupported(f"deepstack_visual_indexes {list(deepstack)}",
                          expected=f"distinct block indices in 0..{vc.depth - 1}")
    text = config.text_config
    if len(deepstack) > text.num_hidden_layers:
        raise unsupported(f"{len(deepstack)} DeepStack features for a {text.num_hidden_layers}-layer LLM",
                          expected="at most one per LLM layer")
    return {**layout, "deepstack_layers": deepstack, "video_min_pixels": 0, "video_max_pixels": 0}


FAMILY = replace(
    QWEN2_VL,
    model_type="qwen3_vl",
    family="qwen3-vl",
    config_class="Qwen3VLConfig",
    model_class="Qwen3VLForConditionalGeneration",
    layout=qwen3_layout,
    # LayerNorm blocks with a fused qkv and a linear_fc1 / GELU (tanh) / linear_fc2 MLP; the
    # hub's config.json names the vision config "qwen3_vl", which transformers renames
    vision_towers={name: {"has_cls": False, "mlp": "gelu", "layers": "depth", "heads": "num_heads"}
                   for name in ("qwen3_vl_vision", "qwen3_vl")},
    text_models={"qwen3_vl_text": {"mlp": "swiglu"}},
)
