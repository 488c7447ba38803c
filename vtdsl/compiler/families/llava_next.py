"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, anyres): llava-next-7b, tiny-llava-next.

Each image is encoded as crops: a base view (the image resized to one crop) and a grid of
crops picked by the image's size from the model's pinpoints. The LLM receives the base view,
then the grid crops' feature map, unpadded to the image's aspect ratio, each of its rows
ended by a learned newline token (`pack_image_features`). Every count depends on the image,
so `image_sizes` is the size argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..runtime import CompileError, Tokens
from .base import Family

if TYPE_CHECKING:  # pragma: no cover
    from ...ir.plan import Plan
    from ...models.spec import ModelSpec
    from ..installer import Installer


def anyres_tokens(images: int, n: int, spec: ModelSpec, device, intact: bool = True) -> Tokens:
    """An image's visual tokens as LLaVA-NeXT hands them to the LLM: `vid` is the index in
    that sequence (1-based; no ViT identity survives the packing), off every grid; the crop
    of each token from the packed layout: intact (base view, then the grid crops' feature
    map row by row, each row ending in a newline token, which counts with the row's last
    crop), or pruned crops concatenated with equal counts (`intact=False`: a ViT stage
    changed the crops' counts, even when the total happens to equal the intact one)."""
    idx = torch.arange(n, device=device)
    crops = spec.vit_crops
    if intact and n == spec.image_tokens:
        side_r, side_c = spec.llm_grid
        base = side_r * side_c
        rows, cols, top, left = spec.crop_map  # the unpadded part of the crops' map
        width = cols + (1 if spec.image_newline else 0)
        r, c = (idx - base) // width + top, ((idx - base) % width).clamp(max=cols - 1) + left
        crop = torch.where(idx < base, 0, 1 + (r // side_r) * spec.anyres_grid[1] + c // side_c)
    elif n % crops == 0:
        crop = idx // (n // crops)
    else:
        raise CompileError(f"{n} visual tokens per image cannot be split into {spec.name}'s {crops} crops")
    return Tokens((idx + 1)[None].expand(images, -1), torch.full_like(idx, -1)[None].expand(images, -1), (0, 0),
                  crop[None].expand(images, -1), crops)


class LlavaNext(Family):
    """Anyres crops, newline tokens, unpadding; `image_sizes` per call."""

    name = "llava-next"
    size_argument = "image_sizes"
    layout_fields = ("anyres_grid",)

    def image_sizes(self, spec: ModelSpec, kwargs: dict[str, Any]) -> list[tuple[int, int]] | None:
        rows = self.size_rows(kwargs, 2) or []
        return [(int(h), int(w)) for h, w in rows] or None

    def layout_key(self, spec: ModelSpec) -> tuple:
        return spec.anyres_grid, spec.anyres_map

    def video_spec(self, spec: ModelSpec, kwargs: dict[str, Any]) -> ModelSpec | None:
        """Videos of fixed-size frames (`ModelSpec.frame_pool`): the frames a call's
        ``pixel_values_videos`` ``[B, frames, C, H, W]`` holds, each one crop."""
        value = kwargs.get(self.video_argument) if self.video_argument else None
        if value is None:
            return None
        if value.dim() != 5:
            raise CompileError(f"pixel_values_videos of shape {list(value.shape)}: expected "
                               "[batch, frames, channels, height, width]")
        _, frames, _, height, width = value.shape
        return spec.for_video(frames, height, width)

    def llm_tokens(self, spec: ModelSpec, images: int, per_image: int, device, vit_tokens: Tokens | None, *,
                   intact: bool) -> Tokens:
        if spec.video_frames:  # a video's frames, one pooled grid each
            return super().llm_tokens(spec, images, per_image, device, vit_tokens, intact=intact)
        # the packing leaves no ViT identity to carry over: tokens are read off the layout
        return anyres_tokens(images, per_image, spec, device, intact=intact)

    def trimmed_tokens(self, spec: ModelSpec, tokens: Tokens, images: int, per_image: int, device) -> Tokens:
        # crops concatenated, now of the kept count
        return anyres_tokens(images, per_image, spec, device, intact=False)

    def check(self, plan: Plan, features_vary: bool) -> None:
        spec = plan.spec
        if features_vary and plan.projector_tokens == spec.projector_tokens:
            raise CompileError(f"an adaptive count that may keep all {spec.patch_tokens} tokens of a crop leaves "
                               f"{spec.name}'s crops in their packed layout (newline tokens) or not, per call; "
                               "bound it below that, or end the vision-tower stages with a fixed count")

    def install(self, installer: Installer, plan: Plan) -> None:
        """Packing needs every crop's full grid. With pruned crops, the kept tokens of each
        crop are concatenated in crop order (base view first) instead, as the published
        anyres pruning methods do: `crops x k` visual tokens per image, no newline tokens.
        On families that take video, video calls under ViT stages or scores are refused (a
        frame's pool needs its whole grid)."""
        spec = plan.spec
        if self.video_argument is not None and self.reads_vit(plan):
            self.refuse_video(installer, plan, f"a compiled {spec.name} with ViT stages or scores refuses "
                              "pixel_values_videos: each frame's features are pooled from its whole grid; prune a "
                              "video at LLM sites", "refuse video inputs: ViT stages are planned for images")
        if plan.projector_tokens == spec.projector_tokens:
            return
        owner_path = spec.projector_path.rpartition(".")[0]
        owner = installer.model.get_submodule(owner_path)
        if not hasattr(owner, "pack_image_features"):
            raise CompileError(f"{type(owner).__name__} has no pack_image_features to replace")
        per_crop = plan.projector_tokens // spec.vit_crops
        installer.override(owner_path, "pack_image_features", _concatenate_crops, "method-override",
                           f"concatenate each image's pruned crops ({per_crop} tokens each, base view first) "
                           "instead of unpadding them into a map with newline tokens")


def _concatenate_crops(image_features, image_sizes=None, *_, **__):
    """`pack_image_features` for pruned crops: each image's crops one after the other (the
    other arguments, LLaVA-NeXT's newline and strategy, OneVision's aspect ratio, unused)."""
    packed = [f.reshape(-1, f.shape[-1]) for f in image_features]
    lens = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=packed[0].device)
    return packed, lens


FAMILY = LlavaNext()
