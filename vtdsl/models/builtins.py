"""The built-in models, written out as transformers `config.json` dictionaries.

The values are the published configs of the Hugging Face checkpoints (architecture only:
no weights are downloaded). Fields not listed take transformers' defaults, exactly as when
the hub file is loaded; the defaults that matter are spelled out in the comments.

llava-hf/llava-1.5-7b-hf and llava-hf/llava-1.5-13b-hf:
- vision: CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336): 24 layers,
  hidden 1024, ffn 4096, 16 heads, patch 14, 3 channels, quick_gelu (CLIP default).
  (24x24 = 576 patches + CLS = 577 tokens per layer.)
- features: layer -2 (output of layer 22 of 0..23), strategy "default" (CLS dropped).
- projector: linear 1024 -> d, gelu, linear d -> d (with biases).
- text: Vicuna v1.5 (Llama 2 architecture): 7b — hidden 4096, ffn 11008, 32 layers,
  32 heads, 32 KV heads (Llama defaults); 13b — hidden 5120, ffn 13824, 40 layers,
  40 heads, 40 KV heads. vocab 32064 (32000 + <image> + <pad> padded to 64),
  max positions 4096, rms_norm_eps 1e-5, untied lm_head.
- image_token_index 32000, pad_token_id 32001, float16.
"""

from __future__ import annotations

import copy

_CLIP_L14_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
    # CLIP defaults, stated: num_channels 3, hidden_act quick_gelu, layer_norm_eps 1e-5
}

_LLAVA_15_COMMON = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "ignore_index": -100,
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}

LLAVA_15_7B = {
    **_LLAVA_15_COMMON,
    "vision_config": _CLIP_L14_336,
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,  # Llama default, stated
        "intermediate_size": 11008,  # Llama default, stated
        "num_hidden_layers": 32,  # Llama default, stated
        "num_attention_heads": 32,  # Llama default, stated
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
}

LLAVA_15_13B = {
    **_LLAVA_15_COMMON,
    "vision_config": _CLIP_L14_336,
    "text_config": {
        "_name_or_path": "lmsys/vicuna-13b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
}

# The test model of docs/dev/contracts.md: small enough for exact CPU runs in tests.
TINY_LLAVA = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 255,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 32,
        "image_size": 336,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "num_channels": 3,
        "projection_dim": 32,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 2048,
        "torch_dtype": "float32",
    },
}

# name -> (config.json dict, description)
BUILTINS: dict[str, tuple[dict, str]] = {
    "llava-1.5-7b": (LLAVA_15_7B, "LLaVA-1.5 7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B v1.5"),
    "llava-1.5-13b": (LLAVA_15_13B, "LLaVA-1.5 13B (llava-hf/llava-1.5-13b-hf): CLIP ViT-L/14-336 + Vicuna-13B v1.5"),
    "tiny-llava": (TINY_LLAVA, "tiny random LLaVA for tests (docs/dev/contracts.md), float32"),
}

# Other spellings users type for the same architectures.
ALIASES: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "llava-1.5-7b-hf": "llava-1.5-7b",
    "liuhaotian/llava-v1.5-7b": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
    "llava-1.5-13b-hf": "llava-1.5-13b",
    "liuhaotian/llava-v1.5-13b": "llava-1.5-13b",
}


def builtin_config_dict(name: str) -> dict:
    return copy.deepcopy(BUILTINS[name][0])
