"""LLaVA-1.5 (`llava`): a CLIP tower, a 2-layer projector, a Llama-style LLM."""

from __future__ import annotations

from .base import ModelFamily

# Hub checkpoints (llava-hf, and transformers 4.x/5.x save_pretrained) name keys
# `language_model.model.*`, `vision_tower.vision_model.*`, ...; transformers 5 modules are
# `model.language_model.*`, `model.vision_tower.*` (no vision_model). First match wins.
_RENAMES = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^language_model\.", "model.language_model."),
)

_CLIP = {"clip_vision_model": {"has_cls": True, "mlp": "gelu", "layers": "num_hidden_layers",
                   "heads": "num_attention_heads"}}
# Language models with the Llama layer layout (q/k/v/o, gate/up/down, RMSNorm) that
# llava-hf checkpoints pair with CLIP.
_LLAMA_LIKE = {"llama": {"mlp": "swiglu"}, "mistral": {"mlp": "swiglu"}, "qwen2": {"mlp": "swiglu"}}

FAMILY = ModelFamily(
    model_type="llava", family="llava", config_class="LlavaConfig", model_class="LlavaForConditionalGeneration",
    vit_layer_path="model.vision_tower.encoder.layers.{i}", projector_path="model.multi_modal_projector",
    llm_layer_path="model.language_model.layers.{i}",
    checkpoint_renames=_RENAMES, vision_towers=_CLIP, text_models=_LLAMA_LIKE,
)
