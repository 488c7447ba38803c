"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): qwen2.5-vl-7b, tiny-qwen2.5-vl.

Qwen2-VL's layout (`qwen2_vl`: dynamic resolution, 2x2 merger, M-RoPE) with a vision
tower that attends in windows and orders patches by window; the plan's window size must
match the model's.
"""

from __future__ import annotations

from .qwen2_vl import Qwen2VL


class Qwen25VL(Qwen2VL):
    """Window ViT, 2x2 merger, M-RoPE; `image_grid_thw` per call."""

    name = "qwen2.5-vl"
    layout_fields = ("spatial_merge", "vit_window")


FAMILY = Qwen25VL()
