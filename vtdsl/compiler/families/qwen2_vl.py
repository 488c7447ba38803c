"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): qwen2-vl-7b, tiny-qwen2-vl.

Dynamic resolution: the patch grid is the image's own (`image_grid_thw`, in patches), so
every count depends on the image. The merger (the projector here) turns each 2x2 group of
patches into one LLM token, so the IR refuses ViT stages and ViT scores, and LLM stages
see the merged grid. The LLM gives visual tokens M-RoPE positions (time, row, column
streams, computed by the model from the prompt), which the LLM hooks gather like any
position ids. Qwen2.5-VL (`qwen2_5_vl`) is this layout with windows in the ViT.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

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
    layout_fields = ("spatial_merge",)

    def image_sizes(self, spec: ModelSpec, kwargs: dict[str, Any]) -> list[tuple[int, int]] | None:
        rows = self.size_rows(kwargs, 3)
        if rows is None:
            return None
        if any(t != 1 for t, _, _ in rows):
            raise CompileError("vtdsl compiles image inputs only (image_grid_thw with t = 1), not video")
        return [(h * spec.patch_size, w * spec.patch_size) for _, h, w in rows] or None

    def sized_spec(self, spec: ModelSpec, height: int, width: int) -> ModelSpec:
        # already the processor's size (image_grid_thw): resizing again into the spec's
        # pixel range would miscount a processor set to another range
        return spec.for_grid(height // spec.patch_size, width // spec.patch_size)

    def layout_key(self, spec: ModelSpec) -> tuple:
        return (spec.image_grid,)

    def install(self, installer: Installer, plan: Plan) -> None:
        """Refuse video calls: the LLM stages find visual tokens by the image placeholder, so
        a video's (`video_token_id`) would pass through as text, unpruned and unscored.
        `vtdsl check --video` costs videos; compiling them is not done yet."""
        if not plan.stages and not plan.observations:
            return
        owner_path = self.multimodal_path(plan.spec)
        original = getattr(installer.model.get_submodule(owner_path), "get_video_features", None)
        if original is None:
            return

        @functools.wraps(original)  # generate() reads its signature to pick the encoder's inputs
        def get_video_features(*_, **__):
            raise CompileError("vtdsl compiles image inputs only: a compiled Qwen-VL model refuses "
                               "pixel_values_videos (its LLM stages would not see the video's tokens)")

        installer.override(owner_path, "get_video_features", get_video_features, "method-override",
                           "refuse video inputs: the LLM stages prune image placeholders only")


FAMILY = Qwen2VL()
