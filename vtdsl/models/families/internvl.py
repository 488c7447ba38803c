"""InternVL3 (`internvl`): InternViT (a CLS token, layer scale, absolute positions), a pixel
shuffle that folds each 2x2 group of patches into one token 4x wider, a LayerNorm + 2-layer
MLP projector, and a Qwen2.5 LLM. The image processor cuts an image into 448-pixel tiles
(the grid whose aspect ratio is closest to the image's, between a minimum and maximum tile
count) and appends a thumbnail tile when it cut more than one."""

from __future__ import annotations

from typing import Any

from .base import ModelFamily, unsupported

# transformers' GotOcr2 image processor defaults (min_patches / max_patches), which the
# InternVL processor uses with `crop_to_patches` forced on
DEFAULT_TILES = (1, 12)


def _square(value, what: str) -> int:
    """InternVL configs give sides as [height, width]; vtdsl's grids are square."""
    pair = tuple(value) if isinstance(value, (list, tuple)) else (value, value)
    if len(pair) != 2 or pair[0] != pair[1]:
        raise unsupported(f"vision_config.{what} {list(pair)}", expected="a square [n, n]")
    return int(pair[0])


def tile_range(config, side: int) -> tuple[int, int]:
    """(min, max) tiles per image from the preprocessor_config.json the registry attached
    (`vtdsl_preprocessor`), whose tiles must be the tower's own size; (1, 1): one tile."""
    pre = getattr(config, "vtdsl_preprocessor", None) or {}
    size = pre.get("size") or {}
    tile = (size.get("height", side), size.get("width", side))
    if tile != (side, side):
        raise unsupported(f"image processor tile size {tile[0]}x{tile[1]}",
                          expected=f"the vision tower's {side}x{side}")
    low, high = pre.get("min_patches", DEFAULT_TILES[0]), pre.get("max_patches", DEFAULT_TILES[1])
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise unsupported(f"image processor min_patches {low!r} / max_patches {high!r}",
                          expected="integers 1 <= min_patches <= max_patches")
    # the processor cuts tiles only when max_patches > 1 (crop_to_patches is forced on)
    return (low, high) if high > 1 else (1, 1)


def shuffle_layout(config, vc) -> dict[str, Any]:
    """Counts are for one tile (the unit the tower encodes): the pixel shuffle folds each
    s x s group of patches into one token (s = 1 / downsample_ratio), then the projector
    maps its `width·s²` channels to the LLM's width in two linear layers."""
    ratio = config.downsample_ratio
    merge = round(1 / ratio) if ratio > 0 else 0
    if merge < 1 or abs(merge * ratio - 1) > 1e-9:
        raise unsupported(f"downsample_ratio {ratio}", expected="1 / n for a whole n, such as 0.5")
    side, patch = _square(vc.image_size, "image_size"), _square(vc.patch_size, "patch_size")
    if side % patch or (side // patch) % merge:
        raise unsupported(f"a {side}-pixel tile of {patch}-pixel patches cannot be shuffled in {merge}x{merge} groups")
    out = config.text_config.hidden_size
    return {
        "image_size": side,
        "patch_size": patch,
        "projector": (vc.hidden_size * merge * merge, out, out),
        "spatial_merge": merge,
        "tile_range": tile_range(config, side),
        "merged_features": True,
    }


# OpenGVLab/InternVL3-*-hf checkpoints: transformers 4.52+ names (`model.vision_tower.*`,
# `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`) need none; older
# saves nest the LLM as `language_model.model.*` as llava-hf does.
_RENAMES = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.", "model.language_model."),
)

FAMILY = ModelFamily(
    model_type="internvl", family="internvl", config_class="InternVLConfig",
    model_class="InternVLForConditionalGeneration",
    vit_layer_path="model.vision_tower.encoder.layer.{i}", projector_path="model.multi_modal_projector",
    llm_layer_path="model.language_model.layers.{i}", checkpoint_renames=_RENAMES, layout=shuffle_layout,
    # pre-norm blocks (LayerNorm or RMSNorm), q/k/v + projection_layer, a fc1 / GELU / fc2 MLP
    vision_towers={"internvl_vision": {"has_cls": True, "mlp": "gelu", "layers": "num_hidden_layers",
                                       "heads": "num_attention_heads"}},
    text_models={"qwen2": {"mlp": "swiglu"}},
)
