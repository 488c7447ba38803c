"""Gemma 3 (`gemma3`): a SigLIP tower (no CLS token) at 896 pixels, its 64x64 patch map
average-pooled 4x4 to 256 tokens (`Gemma3MultiModalProjector`: pool, RMSNorm, one linear
map without bias), a Gemma 3 LLM (sliding-window and global layers, bidirectional
attention among one image's tokens) and optional pan-and-scan crops."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .base import ModelFamily, unsupported
from .llava import _RENAMES as LLAVA_RENAMES

if TYPE_CHECKING:  # pragma: no cover
    from ..spec import ModelSpec

# The processor's pan-and-scan settings when preprocessor_config.json leaves them null
# (transformers' Gemma3Processor.images_kwargs): off, 256-pixel crops at least, 4 at most,
# cut only beyond an aspect ratio of 1.2.
PAN_AND_SCAN_DEFAULTS = {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
                         "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}


def pan_and_scan(config) -> tuple[int, int, float] | None:
    """(min crop side, max crops, min aspect ratio) when the preprocessor_config.json the
    registry attached (`vtdsl_preprocessor`) turns pan-and-scan on; None when it is off."""
    given = {k: v for k, v in (getattr(config, "vtdsl_preprocessor", None) or {}).items() if v is not None}
    pre = {**PAN_AND_SCAN_DEFAULTS, **given}
    if not pre["do_pan_and_scan"]:
        return None
    low, most, ratio = (pre[k] for k in list(PAN_AND_SCAN_DEFAULTS)[1:])
    if not (isinstance(low, int) and isinstance(most, int) and low >= 1 and most >= 2 and ratio >= 1):
        raise unsupported(f"pan-and-scan settings min_crop_size={low!r}, max_num_crops={most!r}, "
                          f"min_ratio_to_activate={ratio!r}", expected="integers >= 1 and >= 2, a ratio >= 1")
    return low, most, float(ratio)


def with_pan_and_scan(spec: ModelSpec) -> ModelSpec:
    """`spec` counting pan-and-scan crops (`vtdsl check --pan-and-scan`): what the
    processor does when called with `do_pan_and_scan=True` and its other settings as the
    checkpoint's preprocessor left them (null there: the processor's defaults). The
    google/gemma-3-*-it preprocessors leave it off, so the registered specs count one view."""
    if spec.family != "gemma3":
        raise unsupported(f"model {spec.name!r} ({spec.family}) has no pan-and-scan: only Gemma 3's processor "
                          "cuts pan-and-scan crops", expected="--pan-and-scan with a Gemma 3 model")
    if spec.pan_and_scan:
        return spec
    config = spec.config()
    config.vtdsl_preprocessor = {**(getattr(config, "vtdsl_preprocessor", None) or {}), "do_pan_and_scan": True}
    return replace(spec, pan_and_scan=pan_and_scan(config))


def pooled_layout(config, vc) -> dict[str, Any]:
    """One image is one 896-pixel view (plus its pan-and-scan crops, `for_image`): the
    tower's last layer, every patch, pooled `side / sqrt(mm_tokens_per_image)` per side
    (`spatial_merge`), then one (vision width -> LLM width) matrix per pooled token. The
    projector's norm reads the pooled tokens: `vit.out` stages choose among them there
    (`merged_features`, the projector path), ViT scores summed over each pooled group."""
    side, tokens = vc.image_size // vc.patch_size, config.mm_tokens_per_image
    per_side = math.isqrt(tokens)
    if per_side * per_side != tokens or side % per_side:
        raise unsupported(f"mm_tokens_per_image {tokens} does not pool the {side}x{side} patch map evenly",
                          expected="a square whose side divides the patch map's")
    return {
        "vision_feature_layer": -1,
        "select_strategy": "default",
        "projector": (vc.hidden_size, config.text_config.hidden_size),
        "spatial_merge": side // per_side,
        "merged_features": True,
        "pan_and_scan": pan_and_scan(config),
    }


# google/gemma-3-*-it checkpoints name keys as llava-hf ones do (language_model.model.*,
# vision_tower.vision_model.*, multi_modal_projector.*): transformers maps Gemma 3 with
# LLaVA's renames, and so does vtdsl. The "projector" vtdsl hooks is the projector's
# RMSNorm, the first step after the pool.
FAMILY = ModelFamily(
    model_type="gemma3", family="gemma3", config_class="Gemma3Config", model_class="Gemma3ForConditionalGeneration",
    vit_layer_path="model.vision_tower.encoder.layers.{i}", checkpoint_renames=LLAVA_RENAMES,
    projector_path="model.multi_modal_projector.mm_soft_emb_norm",
    llm_layer_path="model.language_model.layers.{i}", layout=pooled_layout,
    # SigLIP blocks: LayerNorm, q/k/v/out with biases, a fc1 / tanh-GELU / fc2 MLP
    vision_towers={"siglip_vision_model": {"has_cls": False, "mlp": "gelu", "layers": "num_hidden_layers",
                                           "heads": "num_attention_heads"}},
    # gated tanh-GELU MLP: three matmuls, as SwiGLU
    text_models={"gemma3_text": {"mlp": "swiglu"}},
)
