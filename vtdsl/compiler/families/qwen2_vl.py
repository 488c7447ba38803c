"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): qwen2-vl-7b, tiny-qwen2-vl.

Dynamic resolution: the patch grid is the image's own (`image_grid_thw`, in patches), so
every count depends on the image. The merger (the projector here) turns each 2x2 group of
patches into one LLM token, so the IR refuses ViT stages and ViT scores, and LLM stages
see the merged grid. The LLM gives visual tokens M-RoPE positions (time, row, column
streams, computed by the model from the prompt), which the LLM hooks gather like any
position ids. Qwen2.5-VL (`qwen2_5_vl`) is this layout with windows in the ViT.

Video (`pixel_values_videos`, `video_grid_thw`): the frames come in temporal groups of
`temporal_patch`, each group one merged grid, the groups one after another under
`video_token_id` placeholders. LLM stages run the plan checked for the call's video
(`video_spec`: crops = the groups), and its tokens know their frame (`Tokens.video`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..runtime import CompileError
from .base import Family

if TYPE_CHECKING:  # pragma: no cover
    from ...ir.plan import Plan
    from ...models.spec import ModelSpec
    from ..installer import Installer


class Qwen2VL(Family):
    """Full-attention ViT, 2x2 merger, M-RoPE; `image_grid_thw` per call."""

    name = "qwen2-vl"
    size_argument = "image_grid_thw"
    video_argument = "video_grid_thw"
    layout_fields = ("spatial_merge",)

    def image_sizes(self, spec: ModelSpec, kwargs: dict[str, Any]) -> list[tuple[int, int]] | None:
        rows = self.size_rows(kwargs, 3)
        if rows is None:
            return None
        if any(t != 1 for t, _, _ in rows):
            raise CompileError("image_grid_thw carries image inputs only (t = 1); pass a video as "
                               "pixel_values_videos and video_grid_thw")
        return [(h * spec.patch_size, w * spec.patch_size) for _, h, w in rows] or None

    def sized_spec(self, spec: ModelSpec, height: int, width: int) -> ModelSpec:
        # already the processor's size (image_grid_thw): resizing again into the spec's
        # pixel range would miscount a processor set to another range
        return spec.for_grid(height // spec.patch_size, width // spec.patch_size)

    def layout_key(self, spec: ModelSpec) -> tuple:
        return (spec.image_grid,)

    def video_spec(self, spec: ModelSpec, kwargs: dict[str, Any]) -> ModelSpec | None:
        value = kwargs.get(self.video_argument)
        if value is None:
            return None
        rows = {tuple(r) for r in torch.as_tensor(value).reshape(-1, 3).tolist()}
        if len(rows) > 1:
            raise CompileError(f"a compiled {spec.name} takes videos of one token layout per call; video_grid_thw "
                               f"gives {len(rows)}: {sorted(rows)}; pass them in separate calls")
        (groups, h, w), = rows
        # the processor's grid as it is (as `sized_spec` for images); its frames are the
        # groups' (the processor pads a clip to whole temporal patches)
        return replace(spec, image_grid=(h, w), vit_crops=groups, video_frames=groups * spec.temporal_patch)

    def install(self, installer: Installer, plan: Plan) -> None:
        """Refuse video calls under ViT stages or scores: they are planned for an image's
        patches (one temporal group). LLM stages take videos (the installer records each
        call's `video_grid_thw`)."""
        if self.reads_vit(plan):
            self.refuse_video(installer, plan, "a compiled Qwen-VL model with ViT stages or scores refuses "
                              "pixel_values_videos: they are planned for an image's patches; prune a video at LLM "
                              "sites", "refuse video inputs: ViT stages are planned for images")


FAMILY = Qwen2VL()
