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

from typing import TYPE_CHECKING

from ...ops.scorers import by_canonical
from ..runtime import CompileError
from .smolvlm import SmolVLM

if TYPE_CHECKING:  # pragma: no cover
    from ...ir.plan import Plan
    from ..installer import Installer


class InternVL(SmolVLM):
    """Aspect-matched tiles plus a thumbnail, pixel shuffle before the projector, 1-D RoPE.

    ViT stages keep or drop whole 2x2 groups (merge units) of each tile, one tile per row of
    the tower's batch (`vtdsl.compiler.vit_groups`): inside the tower the CLS row stays, and
    the kept patches go back to their raster rows before the model's own shuffle; `vit.out`
    runs in the projector's pre-hook on the kept units' shuffled tokens, ViT scores summed
    over each unit's 2x2 patches."""

    name = "internvl"
    layout_fields = ("spatial_merge", "tile_range", "merged_features")
    vit_attention = "attention"

    def install(self, installer: Installer, plan: Plan) -> None:
        # scores are computed from the captured q/k projections; InternViT-6B normalises
        # them after the projection (use_qk_norm), which those captures would miss
        vision = installer.model.config.vision_config
        reads = [o for o in plan.observations
                 if o.tower == "vit" and {"q", "k"} & set(by_canonical(o.scorer).projections)]
        if reads and getattr(vision, "use_qk_norm", False):
            raise CompileError(f"'{reads[0].scorer}' at vit.layer{reads[0].layer} reads InternViT's q/k projections, "
                               "which this checkpoint normalises afterwards (use_qk_norm); vtdsl does not "
                               "capture the normalised ones")
        super().install(installer, plan)


FAMILY = InternVL()
