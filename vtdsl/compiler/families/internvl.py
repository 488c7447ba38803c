"""InternVL3 (`InternVLForConditionalGeneration`): internvl3-8b, tiny-internvl3.

The processor cuts an image into tiles of the tower's size, the grid matched to the
image's aspect ratio, plus a thumbnail tile (last) when it cut more than one. The tower
encodes each tile alone (CLS + 32x32 patches at 448 px); `get_image_features` drops CLS
and the pixel shuffle folds each 2x2 group of patches into one token, in raster order on
the tile's 16x16 grid. The prompt holds `<img>`, then every tile's tokens back to back,
then `</img>`; the LLM hooks find them by the image token id. A forward call carries the
tiles but no image size, so, as on SmolVLM, the spec's counts are for one tile unless it
was sized for an image (`for_image`: crops = the image's tiles, counted together).
"""

from __future__ import annotations

from .smolvlm import SmolVLM


class InternVL(SmolVLM):
    """Aspect-matched tiles plus a thumbnail, pixel shuffle before the projector, 1-D RoPE."""

    name = "internvl"
    layout_fields = ("spatial_merge", "tile_range")


FAMILY = InternVL()
