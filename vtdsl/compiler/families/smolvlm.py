"""SmolVLM / Idefics3 (`SmolVLMForConditionalGeneration`, `Idefics3ForConditionalGeneration`):
smolvlm-2.2b, tiny-smolvlm.

The processor splits an image into tiles of the tower's size plus a global view (last);
the tower encodes each tile alone and the connector's pixel shuffle folds each s x s
group of patches into one token, in raster order on the tile's merged grid. In the
prompt each tile's tokens stand between text (`<fake_token_around_image><row_r_col_c>`,
`<global-img>`); the LLM hooks find them by the image token id wherever they are. A
forward call carries no image's size, only its tiles, so the spec's counts are for one
tile unless it was sized for an image (`for_image`: crops = the image's tiles, counted
together, one image per `images x crops` tiles of the call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime import Tokens
from .base import Family
from .llava_next import anyres_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ...models.spec import ModelSpec


class SmolVLM(Family):
    """Tiles plus a global view, pixel-shuffle connector, 1-D RoPE; no size argument.

    `vit.out` is the connector's linear layer's input (`merged_features`): a token there is
    one pixel-shuffled s x s group of a tile, s² patches wide; a `vit.layerN` stage keeps
    or drops whole groups inside the tower (`vtdsl.compiler.vit_groups`); stages run per
    tile (one tile per row of the tower's batch), ViT scores summed over each group. The tower's
    patch mask is not followed: the processor squares every tile, so real tiles have none."""

    name = "smolvlm"
    layout_fields = ("spatial_merge", "merged_features")

    def llm_tokens(self, spec: ModelSpec, images: int, per_image: int, device, vit_tokens: Tokens | None, *,
                   intact: bool) -> Tokens:
        if spec.vit_crops == 1:
            return super().llm_tokens(spec, images, per_image, device, vit_tokens, intact=intact)
        # an image's tiles one after the other, as the prompt holds them: no shared grid
        return anyres_tokens(images, per_image, spec, device, intact=False)


FAMILY = SmolVLM()
