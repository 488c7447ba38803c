"""SmolVLM (`smolvlm`): a SigLIP tower without CLS, a pixel-shuffle connector, image
splitting into tiles plus a global view, a Llama-style LLM (SmolLM2). Idefics3
(`idefics3`) is the same architecture under its own classes."""

from __future__ import annotations

from typing import Any

from .base import ModelFamily, unsupported

# The released processors resize the longest edge to 4 tiles (SmolVLM-Instruct: 1536 for
# 384-pixel tiles; SmolVLM-256M/500M: 2048 for 512), what a config without a
# preprocessor_config.json gets.
DEFAULT_TILES_PER_EDGE = 4


def split_edge(config, vc) -> int:
    """The processor's longest edge before tiling (0: no image splitting), from the
    preprocessor_config.json the registry attached (`vtdsl_preprocessor`), which must cut
    tiles of the vision tower's own size."""
    pre = getattr(config, "vtdsl_preprocessor", None) or {}
    if pre.get("do_image_splitting") is False:
        return 0
    tile = (pre.get("max_image_size") or {}).get("longest_edge", vc.image_size)
    if tile != vc.image_size:
        raise unsupported(f"max_image_size {tile} differs from the vision tower's image_size {vc.image_size}",
                          expected="tiles of the tower's own size")
    edge = (pre.get("size") or {}).get("longest_edge", DEFAULT_TILES_PER_EDGE * tile)
    if not isinstance(edge, int) or edge < tile:
        raise unsupported(f"image processor longest_edge {edge!r}", expected=f"an integer >= the tile side {tile}")
    return edge


def shuffle_layout(config, vc) -> dict[str, Any]:
    """Counts are for one tile (the unit the vision tower encodes): the pixel shuffle
    folds each s x s group of patches into one token `s²` times wider, then one linear
    layer (no bias) maps it to the LLM's width. That layer is the projector vtdsl hooks
    (`projector_path`): its input, the shuffled tokens, is where `vit.out` stages choose
    (`merged_features`)."""
    s, side = config.scale_factor, vc.image_size // vc.patch_size
    if side % s:
        raise unsupported(f"scale_factor {s} does not divide the {side}x{side} patch grid")
    return {
        "vision_feature_layer": -1,
        "select_strategy": "default",
        "projector": (vc.hidden_size * s * s, config.text_config.hidden_size),
        "spatial_merge": s,
        "merged_features": True,
        "split_edge": split_edge(config, vc),
    }


# HuggingFaceTB checkpoints name keys `model.vision_model.*`, `model.connector.*`,
# `model.text_model.*`, `lm_head.*`: transformers 5's module tree as it is.
FAMILY = ModelFamily(
    model_type="smolvlm", family="smolvlm", config_class="SmolVLMConfig", model_class="SmolVLMForConditionalGeneration",
    vit_layer_path="model.vision_model.encoder.layers.{i}", projector_path="model.connector.modality_projection",
    llm_layer_path="model.text_model.layers.{i}", layout=shuffle_layout,
    # SigLIP blocks: LayerNorm, q/k/v/out with biases, a fc1 / tanh-GELU / fc2 MLP
    vision_towers={"smolvlm_vision": {"has_cls": False, "mlp": "gelu", "layers": "num_hidden_layers",
                                      "heads": "num_attention_heads"}},
    text_models={"llama": {"mlp": "swiglu"}},
)
