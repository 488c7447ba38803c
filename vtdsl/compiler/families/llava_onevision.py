"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): llava-onevision-qwen2-7b,
tiny-llava-onevision.

LLaVA-NeXT's anyres layout (base view, grid crops picked from the pinpoints by the image's
size, the crops' map unpadded to its aspect ratio, a newline token ending each row) on a
SigLIP tower without a CLS token, with one step more in `pack_image_features`: under
"anyres_max_N" a map of more than about N crops' tokens is shrunk by bilinear
interpolation (`ModelSpec.crop_map` is the shrunk map). Pruned crops are concatenated as
on LLaVA-NeXT, without newline tokens and without the shrink.

Video (`pixel_values_videos` ``[B, frames, C, H, W]``): each frame one crop, its projected
features resized bilinearly to 14x14 at 384 px, the frames one after another under
`video_token_id` placeholders, one newline token after the last. LLM stages run the plan
checked for the call's frame count (`video_spec`); its tokens know their frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..runtime import Tokens
from .llava_next import LlavaNext, anyres_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ...models.spec import ModelSpec


def onevision_tokens(images: int, n: int, spec: ModelSpec, device, intact: bool = True) -> Tokens:
    """`anyres_tokens`, with the crop of a token of a shrunk map read at the source row and
    column its bilinear sample is centred on (a shrunk token blends neighbours, which lie
    in one crop but at crop borders)."""
    rows, cols, top, left = spec.unpadded_map
    out_rows, out_cols, _, _ = spec.crop_map
    if not intact or n != spec.image_tokens or (out_rows, out_cols) == (rows, cols):
        return anyres_tokens(images, n, spec, device, intact=intact)
    idx = torch.arange(n, device=device)
    side_r, side_c = spec.llm_grid
    base = side_r * side_c
    grid = (idx - base).clamp(min=0)
    width = out_cols + 1 if spec.image_newline else out_cols
    r_out, c_out = grid // width, (grid % width).clamp(max=out_cols - 1)
    # align_corners=False: output index i samples source coordinate (i + 0.5) * scale - 0.5
    r = top + ((r_out + 0.5) * rows / out_rows).floor().long().clamp(max=rows - 1)
    c = left + ((c_out + 0.5) * cols / out_cols).floor().long().clamp(max=cols - 1)
    crop = torch.where(idx < base, 0, 1 + (r // side_r) * spec.anyres_grid[1] + c // side_c)
    crops = spec.vit_crops
    return Tokens((idx + 1)[None].expand(images, -1), torch.full_like(idx, -1)[None].expand(images, -1), (0, 0),
                  crop[None].expand(images, -1), crops)


class LlavaOnevision(LlavaNext):
    """Anyres crops, unpadding, anyres_max shrink, newline tokens; `image_sizes` per call."""

    name = "llava-onevision"
    video_argument = "pixel_values_videos"
    layout_fields = ("anyres_grid", "anyres_max_crops")

    def layout_key(self, spec: ModelSpec) -> tuple:
        if spec.video_frames:  # the frame count, in the video plan's own key, is all there is
            return ()
        return spec.anyres_grid, spec.anyres_map, spec.crop_map

    def llm_tokens(self, spec: ModelSpec, images: int, per_image: int, device, vit_tokens: Tokens | None, *,
                   intact: bool) -> Tokens:
        if spec.video_frames:
            return super().llm_tokens(spec, images, per_image, device, vit_tokens, intact=intact)
        return onevision_tokens(images, per_image, spec, device, intact=intact)


FAMILY = LlavaOnevision()
