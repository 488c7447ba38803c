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

llava-hf/llava-v1.6-vicuna-7b-hf (LLaVA-NeXT): the same CLIP ViT-L/14-336 tower and
projector shape, Vicuna-7B v1.5, and anyres: the image is resized to the best of five
pinpoints ([336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]) and cut into
336-pixel crops, encoded with a 336-pixel base view; the grid crops' feature map is
unpadded and ends each row with a learned `image_newline` token. The largest pinpoint
(672x672: base + 2x2 crops) gives 576 + 48·(48 + 1) = 2928 visual tokens, the counts the
cost model uses. image_token_index 32000, pad_token_id 32001, float16.

Qwen/Qwen2.5-VL-7B-Instruct: a 32-block ViT (hidden 1280, 16 heads, gated-SiLU MLP 3420,
RMSNorm, no CLS token, 2-D rotary positions) on 14-pixel patches with a temporal patch of
2; blocks 7, 15, 23, 31 attend over the whole image, the others in 112-pixel windows (8x8
patches); a merger (RMSNorm, 2x2 patches -> Linear 5120->5120, GELU, Linear 5120->3584)
hands one token per 2x2 patches to Qwen2-7B (hidden 3584, 28 layers, 28 heads, 4 KV
heads, ffn 18944, vocab 152064, M-RoPE sections [16, 24, 24], rope_theta 1e6), bfloat16.
Resolution is dynamic; `vtdsl_reference_image` (a vtdsl key, ignored by transformers)
fixes the image the counts are for: 672x672 -> 48x48 patches -> 576 visual tokens, the
same count as LLaVA-1.5. Its preprocessor_config.json (`vtdsl_preprocessor`, another
vtdsl key) resizes every image's area into [3136, 12845056] pixels (56x56 up to 16384
merged tokens), where transformers' Qwen2VLImageProcessor defaults stop at 28·28·1280.

llava-hf/llava-onevision-qwen2-7b-ov-hf (LLaVA-OneVision): SigLIP so400m/14 at 384 px (26
layers, hidden 1152, ffn 4304, 16 heads, no CLS, no pooling head), features from its last
layer (-1, strategy "full": all 729 patches), a 2-layer projector 1152 -> 3584 -> 3584, and
Qwen2-7B (hidden 3584, ffn 18944, 28 layers, 28 heads, 4 KV heads, rope_theta 1e6, vocab
152128); anyres over the 36 pinpoints 384..2304 in steps of 384 (transformers'
LlavaOnevisionConfig defaults, written out), "anyres_max_9". The vision and top-level
values are those transformers' LlavaOnevisionConfig documents as that checkpoint's; the
text values are the checkpoint's Qwen2 config. The largest pinpoint (2304x2304: base + 6x6
crops) unpads to 162x162 tokens, shrunk to 81x81 under anyres_max_9: 729 + 81·(81 + 1) =
7371 visual tokens, the counts the cost model uses. image_token_index 151646, float16.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

# name -> (config.json dict, description), filled by `_builtin` beside each config
_TABLE: dict[str, tuple[dict, str]] = {}


def _builtin(name: str, config: dict, description: str) -> None:
    _TABLE[name] = (config, description)


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
_builtin("llava-1.5-7b", LLAVA_15_7B, "LLaVA-1.5 7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Vicuna-7B v1.5")

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
_builtin("llava-1.5-13b", LLAVA_15_13B,
         "LLaVA-1.5 13B (llava-hf/llava-1.5-13b-hf): CLIP ViT-L/14-336 + Vicuna-13B v1.5")

LLAVA_NEXT_7B = {
    **_LLAVA_15_COMMON,
    "architectures": ["LlavaNextForConditionalGeneration"],
    "model_type": "llava_next",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "use_image_newline_parameter": True,
    "vision_config": _CLIP_L14_336,
    "text_config": copy.deepcopy(LLAVA_15_7B["text_config"]),
}
_builtin("llava-next-7b", LLAVA_NEXT_7B,
         "LLaVA-NeXT 7B (llava-hf/llava-v1.6-vicuna-7b-hf): anyres CLIP ViT-L/14-336 (base + up to 4 crops) + "
         "Vicuna-7B v1.5")

# llava-hf/LLaVA-NeXT-Video-7B-hf: LLaVA-NeXT-7B's towers, projector and anyres pinpoints
# (CLIP ViT-L/14-336, Vicuna-7B v1.5), image_token_index 32001, video_token_index 32000,
# spatial_pool_mode "average", spatial_pool_stride 2 (transformers' LlavaNextVideoConfig
# defaults, which it documents as this checkpoint's). The values are those of the
# checkpoint's config as AutoConfig prints it in a public script (transformers 4.57.3):
# those defaults plus a linear RoPE scaling of 2.5 (no FLOPs) and vocab 32064; not read
# from the hub itself (no network here). Its video processor is assumed to bring frames to
# 336x336 (the tower's size; CLIP refuses other sizes): 12x12 = 144 tokens a frame.
LLAVA_NEXT_VIDEO_7B = {
    "architectures": ["LlavaNextVideoForConditionalGeneration"],
    "model_type": "llava_next_video",
    "image_token_index": 32001,
    "video_token_index": 32000,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_seq_length": 576,
    "video_seq_length": 288,
    "multimodal_projector_bias": True,
    "projector_hidden_act": "gelu",
    "spatial_pool_mode": "average",
    "spatial_pool_out_channels": 1024,
    "spatial_pool_stride": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_image_newline_parameter": True,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {**_CLIP_L14_336, "hidden_act": "quick_gelu", "num_channels": 3},
    "text_config": {
        **copy.deepcopy(LLAVA_15_7B["text_config"]),
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "linear", "factor": 2.5, "rope_theta": 10000.0},
    },
}
_builtin("llava-next-video-7b", LLAVA_NEXT_VIDEO_7B,
         "LLaVA-NeXT-Video 7B (llava-hf/LLaVA-NeXT-Video-7B-hf): anyres CLIP ViT-L/14-336 + Vicuna-7B v1.5; video "
         "frames pooled 2x2 (144 tokens a frame)")

QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vtdsl_reference_image": [672, 672],
    # preprocessor_config.json of the checkpoint (the processor's pixel range)
    "vtdsl_preprocessor": {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
                           "temporal_patch_size": 2},
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_channels": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 28,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
    },
}
_builtin("qwen2.5-vl-7b", QWEN25_VL_7B,
         "Qwen2.5-VL 7B (Qwen/Qwen2.5-VL-7B-Instruct): window-attention ViT + 2x2 merger + Qwen2-7B with M-RoPE; "
         "counts at 672x672 (576 visual tokens)")

# Qwen/Qwen2-VL-7B-Instruct: Qwen2.5-VL-7B's LLM and token layout (patch 14, temporal
# patch 2, 2x2 merger to 3584, M-RoPE [16, 24, 24]) with the first-generation ViT: 32
# LayerNorm blocks of width 1280 (16 heads), a QuickGELU MLP of 4 x 1280, every block
# attending over the whole image; the merger's LayerNorm -> Linear 5120->5120, GELU,
# Linear 5120->3584. The hub file's vision `in_chans` is transformers 5's `in_channels`;
# its flat text keys are nested here as in QWEN25_VL_7B. Same preprocessor pixel range.
QWEN2_VL_7B = {
    **{k: v for k, v in QWEN25_VL_7B.items() if k not in ("vision_config", "text_config")},
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        # default, stated: hidden_act quick_gelu
    },
    "text_config": {
        **copy.deepcopy(QWEN25_VL_7B["text_config"]),
        "model_type": "qwen2_vl_text",
        "max_position_embeddings": 32768,
    },
}
_builtin("qwen2-vl-7b", QWEN2_VL_7B,
         "Qwen2-VL 7B (Qwen/Qwen2-VL-7B-Instruct): full-attention ViT + 2x2 merger + Qwen2-7B with M-RoPE; counts at "
         "672x672 (576 visual tokens)")

_ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

LLAVA_ONEVISION_7B = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "model_type": "llava_onevision",
    "image_token_index": 151646,
    "video_token_index": 151647,
    "image_grid_pinpoints": _ONEVISION_PINPOINTS,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "use_image_newline_parameter": True,
    "vision_aspect_ratio": "anyres_max_9",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 26,
        "patch_size": 14,
        "vision_use_head": False,
        # SigLIP defaults, stated: num_channels 3, hidden_act gelu_pytorch_tanh
    },
    "text_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": 152128,
    },
}
_builtin("llava-onevision-qwen2-7b", LLAVA_ONEVISION_7B,
         "LLaVA-OneVision 7B (llava-hf/llava-onevision-qwen2-7b-ov-hf): anyres_max_9 SigLIP-so400m/14-384 (base + up "
         "to 36 crops) + Qwen2-7B; counts at 2304x2304 (7371 visual tokens)")

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
_builtin("tiny-llava", TINY_LLAVA, "tiny random LLaVA for tests (docs/dev/contracts.md), float32")

# tiny-llava's towers with LLaVA-NeXT's anyres layout at a 56-pixel crop (4x4 patches of
# 14): pinpoints scaled from llava-v1.6 (largest 112x112: base + 2x2 crops, 16 + 8·9 = 88
# visual tokens), 4 ViT and 4 LLM layers so exact CPU runs stay fast.
TINY_LLAVA_NEXT = {
    **copy.deepcopy(TINY_LLAVA),
    "architectures": ["LlavaNextForConditionalGeneration"],
    "model_type": "llava_next",
    "image_grid_pinpoints": [[56, 112], [112, 56], [112, 112]],
    "use_image_newline_parameter": True,
}
TINY_LLAVA_NEXT["vision_config"].update(image_size=56, num_hidden_layers=4)
TINY_LLAVA_NEXT["text_config"].update(num_hidden_layers=4)
_builtin("tiny-llava-next", TINY_LLAVA_NEXT, "tiny random LLaVA-NeXT (anyres, 56-pixel crops) for tests, float32")

# LLaVA-NeXT-Video at tiny widths: 112-pixel CLIP crops (8x8 patches, CLS dropped),
# pinpoints 112..224 (largest: base + 2x2 crops, 64 + 16·17 = 336 visual tokens), a video
# frame pooled to 4x4 = 16 tokens; 4 ViT and 4 LLM layers.
TINY_LLAVA_NEXT_VIDEO = {
    **copy.deepcopy(TINY_LLAVA),
    "architectures": ["LlavaNextVideoForConditionalGeneration"],
    "model_type": "llava_next_video",
    "image_token_index": 255,
    "video_token_index": 254,
    "image_grid_pinpoints": [[112, 224], [224, 112], [224, 224]],
    "spatial_pool_mode": "average",
    "spatial_pool_stride": 2,
    "use_image_newline_parameter": True,
}
TINY_LLAVA_NEXT_VIDEO["vision_config"].update(image_size=112, num_hidden_layers=4)
TINY_LLAVA_NEXT_VIDEO["text_config"].update(num_hidden_layers=4)
_builtin("tiny-llava-next-video", TINY_LLAVA_NEXT_VIDEO,
         "tiny random LLaVA-NeXT-Video (anyres and 2x2-pooled video frames, 112-pixel crops) for tests, float32")

# Qwen2.5-VL's layout at tiny widths: 4 ViT blocks (1 and 3 full attention, the others in
# 56-pixel windows of 4x4 patches), 2x2 merger, 4 LLM layers with M-RoPE; a 224x224
# reference image: 16x16 patches -> 64 visual tokens.
TINY_QWEN25_VL = {
    **{k: v for k, v in QWEN25_VL_7B.items() if k not in ("vision_config", "text_config")},
    "bos_token_id": 0,
    "eos_token_id": 1,
    "image_token_id": 250,
    "vision_start_token_id": 251,
    "vision_end_token_id": 252,
    "vision_token_id": 253,
    "video_token_id": 254,
    "torch_dtype": "float32",
    "vtdsl_reference_image": [224, 224],
    "vision_config": {
        "depth": 4, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
        "in_channels": 3, "out_hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1, 3],
    },
    "text_config": {
        "model_type": "qwen2_5_vl_text", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "torch_dtype": "float32",
    },
}
_builtin("tiny-qwen2.5-vl", TINY_QWEN25_VL,
         "tiny random Qwen2.5-VL (windows, 2x2 merger, M-RoPE; 224x224 reference) for tests, float32")

# Qwen2-VL's layout at tiny widths: 4 full-attention ViT blocks (width 32, MLP 64), 2x2
# merger, 4 LLM layers with M-RoPE; a 224x224 reference image: 64 visual tokens.
TINY_QWEN2_VL = {
    **{k: v for k, v in TINY_QWEN25_VL.items() if k not in ("vision_config", "text_config")},
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vision_config": {
        "depth": 4, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 4, "in_channels": 3, "hidden_size": 32,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "text_config": {**copy.deepcopy(TINY_QWEN25_VL["text_config"]), "model_type": "qwen2_vl_text"},
}
_builtin("tiny-qwen2-vl", TINY_QWEN2_VL,
         "tiny random Qwen2-VL (full-attention ViT, 2x2 merger, M-RoPE; 224x224 reference) for tests, float32")

# Qwen/Qwen3-VL-8B-Instruct (config.json and preprocessor_config.json): a 27-block
# LayerNorm ViT (hidden 1152, 16 heads, GELU-tanh MLP 4304, patch 16, temporal patch 2, 2304 learned positions
# interpolated to each grid), a merger (LayerNorm, 2x2 patches -> Linear 4608->4608, GELU,
# Linear 4608->4096) and three DeepStack mergers of the same widths on blocks 8, 16 and 24,
# whose features are added to the visual tokens after LLM layers 0, 1 and 2; Qwen3-8B
# (hidden 4096, 36 layers, 32 heads, 8 KV heads of 128, q/k RMSNorm, SwiGLU 12288, vocab
# 151936, untied), interleaved M-RoPE sections [24, 20, 20], rope_theta 5e6, bfloat16. The
# processor resizes every image's area into [65536, 16777216] pixels in 32-pixel units. At a
# 768x768 reference: 48x48 patches -> 576 visual tokens, the LLaVA-1.5 count.
# Checked (offline: copies of the checkpoint's metadata, not the hub itself): the GGUF
# metadata of Ollama's conversion (ollama.com/library/qwen3-vl:8b-instruct-bf16, blob
# 9b99cf8ef107: 36 blocks, width 4096, FFN 12288, 32 heads, 8 KV heads of 128, RMS eps
# 1e-6, context 262144, RoPE base 5e6; vision 27 blocks, width 1152, 16 heads, patch 16,
# temporal patch 2, merge 2, DeepStack [8, 16, 24], pixels 65536..16777216) and a
# fine-tune's config.json keeping the architecture (huggingface.co/Steinate/Cortex:
# mrope_section [24, 20, 20] interleaved, vocab 151936, untied, image / video ids 151655 /
# 151656, eos 151645); Ascend/MindSpeed-MM's examples/qwen3vl/model_8B.json agrees on
# the depths and widths. Seen only in third-party transcriptions (not checked): the
# vision FFN 4304, out_hidden_size 4096, num_position_embeddings 2304, vision start / end
# ids 151652 / 151653; the published total, 8.77 B, agrees with the count they give.
QWEN3_VL_8B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "model_type": "qwen3_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vtdsl_reference_image": [768, 768],
    "vtdsl_preprocessor": {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
                           "merge_size": 2, "temporal_patch_size": 2},
    "vision_config": {
        "model_type": "qwen3_vl_vision", "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": 4304, "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": 4096, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
    "text_config": {
        "model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_act": "silu", "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                            "mrope_interleaved": True},
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}
_builtin("qwen3-vl-8b", QWEN3_VL_8B,
         "Qwen3-VL 8B (Qwen/Qwen3-VL-8B-Instruct): "
         "full-attention ViT + 2x2 merger + DeepStack (blocks 8/16/24 into LLM layers 0-2) + Qwen3-8B with "
         "interleaved M-RoPE; counts at 768x768 (576 visual tokens)")

# Qwen3-VL's layout at tiny widths: 4 ViT blocks (width 32, MLP 64, patch 16), DeepStack on
# blocks 0, 1, 2 (added after LLM layers 0, 1, 2), 2x2 merger, 4 Qwen3 layers (head_dim 8,
# q/k norms) with interleaved M-RoPE; a 256x256 reference image: 16x16 patches -> 64 visual tokens.
TINY_QWEN3_VL = {
    **{k: v for k, v in QWEN3_VL_8B.items() if k not in ("vision_config", "text_config")},
    "image_token_id": 250, "vision_start_token_id": 251, "vision_end_token_id": 252, "video_token_id": 254,
    "torch_dtype": "float32",
    "vtdsl_reference_image": [256, 256],
    "vision_config": {
        **QWEN3_VL_8B["vision_config"], "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
        "out_hidden_size": 32, "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1, 2],
    },
    "text_config": {
        **QWEN3_VL_8B["text_config"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 1, 1],
                            "mrope_interleaved": True},
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "torch_dtype": "float32",
    },
}
_builtin("tiny-qwen3-vl", TINY_QWEN3_VL,
         "tiny random Qwen3-VL (2x2 merger, DeepStack into LLM layers 0-2, M-RoPE; 256x256 reference) for tests, "
         "float32")

# LLaVA-OneVision's layout at tiny widths: 56-pixel SigLIP crops (4x4 patches), pinpoints
# 56..168 in steps of 56 and "anyres_max_4", so the largest (168x168: base + 3x3 crops,
# a 12x12 map) is shrunk to 8x8: 16 + 8·9 = 88 visual tokens; 4 ViT and 4 Qwen2 layers.
TINY_LLAVA_ONEVISION = {
    **{k: v for k, v in LLAVA_ONEVISION_7B.items() if k not in ("vision_config", "text_config")},
    "image_token_index": 255,
    "video_token_index": 254,
    "image_grid_pinpoints": [[56 * i, 56 * j] for i in range(1, 4) for j in range(1, 4)],
    "vision_aspect_ratio": "anyres_max_4",
    "torch_dtype": "float32",
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 32, "image_size": 56, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 4, "patch_size": 14, "vision_use_head": False,
    },
    "text_config": {
        "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-06, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False, "torch_dtype": "float32",
    },
}
_builtin("tiny-llava-onevision", TINY_LLAVA_ONEVISION,
         "tiny random LLaVA-OneVision (anyres_max_4, 56-pixel SigLIP crops) for tests, float32")

# HuggingFaceTB/SmolVLM-Instruct (model_type idefics3; transformers' Idefics3 classes):
# SigLIP so400m at 384 px (27 layers, hidden 1152, ffn 4304, 16 heads, patch 14: 27x27
# patches, no CLS), pixel shuffle 3 (729 -> 81 tokens of 1152·9 per tile), one linear
# 10368 -> 2048 without bias, SmolLM2-1.7B (Llama layout: 24 layers, hidden 2048, ffn
# 8192, 32 heads and KV heads, vocab 49155, rope_theta 273768), image_token_id 49153,
# bfloat16. Its processor resizes the longest edge to 1536 and cuts 384-pixel tiles plus
# a global view (up to 4x4 + 1 = 17 tiles, 1377 tokens). Values as published on the hub
# (config.json / preprocessor_config.json); transformers' Idefics3Config defaults
# describe no released checkpoint. Checked (offline) against a copy of SmolVLM-Instruct's
# config.json (huggingface.co/chflame163/ComfyUI_LayerStyle, ComfyUI/models/smol/
# SmolVLM-Instruct/config.json: image_seq_len 81, image_token_id 49153, scale_factor 3,
# text width 2048, FFN 8192, head_dim 64, max_position_embeddings 16384) and SmolVLM-
# Base's (huggingface.co/frontrx/ECGv3: the same and 24 layers). Not checked (the excerpts
# stop before them): the text vocab 49155, heads 32 / KV 32, rope_theta 273768, the vision
# config and the processor's 1536 / 384 edges; the published total, 2.25 B, agrees.
SMOLVLM_2B = {
    "architectures": ["Idefics3ForConditionalGeneration"],
    "model_type": "idefics3",
    "image_token_id": 49153,
    "scale_factor": 3,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vtdsl_preprocessor": {"do_image_splitting": True, "size": {"longest_edge": 1536},
                           "max_image_size": {"longest_edge": 384}},
    "vision_config": {
        "model_type": "idefics3_vision", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "num_channels": 3,
        # defaults, stated: hidden_act gelu_pytorch_tanh, layer_norm_eps 1e-6
    },
    "text_config": {
        "model_type": "llama", "vocab_size": 49155, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64,
        "rms_norm_eps": 1e-05, "max_position_embeddings": 16384,
        "rope_parameters": {"rope_type": "default", "rope_theta": 273768.0}, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}
_builtin("smolvlm-2.2b", SMOLVLM_2B,
         "SmolVLM 2.2B (HuggingFaceTB/SmolVLM-Instruct, idefics3): SigLIP-384 tiles + pixel shuffle 3 + SmolLM2-1.7B; "
         "counts per 384-pixel tile (81 visual tokens)")

# SmolVLM's layout at tiny widths (model_type smolvlm): 64-pixel tiles of 8x8 patches,
# pixel shuffle 2 (16 tokens per tile), 4 ViT and 4 LLM layers; the processor's longest
# edge 256 (up to 4x4 tiles + a global view); the rest (RoPE theta, norms) is smolvlm-2.2b's.
TINY_SMOLVLM = {
    **copy.deepcopy(SMOLVLM_2B),
    "architectures": ["SmolVLMForConditionalGeneration"], "model_type": "smolvlm", "image_token_id": 250,
    "scale_factor": 2, "torch_dtype": "float32",
    "vtdsl_preprocessor": {"do_image_splitting": True, "size": {"longest_edge": 256},
                           "max_image_size": {"longest_edge": 64}},
}
TINY_SMOLVLM["vision_config"].update(model_type="smolvlm_vision", hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8)
TINY_SMOLVLM["text_config"].update(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                   torch_dtype="float32")
_builtin("tiny-smolvlm", TINY_SMOLVLM,
         "tiny random SmolVLM (64-pixel tiles, pixel shuffle 2; 16 tokens per tile) for tests, float32")

# vtbench v2 (issue 22, docs/vtbench.md): LLaVA-1.5's geometry and cost structure at tiny
# widths. 192-pixel images on 8-pixel patches: 24x24 = 576 patches + CLS, features from
# layer -2 (the 4th ViT layer runs but feeds nothing, as in LLaVA-1.5), strategy "default".
# The tower is 5.6 % of the unpruned prefill FLOPs at vtbench2's mean prompt (LLaVA-1.5-7B:
# about 4 %; tests/test_vtbench2_model.py checks it with FlopCounterMode), and 16 LLM layers
# give the zoo's layer choices the relative depth they have on a 32-layer LLaVA. Vocab 256
# (the word-level vtbench2 tokenizer fits; special ids as vtbench v1: pad 0, <s> 2, </s> 3,
# <image> 4). 3.4 M parameters, 13.6 MB in float32. Random weights until trained.
TINY_LLAVA_VTBENCH2 = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "image_token_index": 4,
    "image_seq_length": 576,
    "pad_token_id": 0,
    "projector_hidden_act": "gelu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 48,
        "image_size": 192,
        "intermediate_size": 192,
        "num_attention_heads": 4,
        "num_hidden_layers": 4,
        "patch_size": 8,
        "num_channels": 3,
        "projection_dim": 48,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 16,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "hidden_act": "silu",
        "vocab_size": 256,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "torch_dtype": "float32",
    },
}
_builtin("tiny-llava-vtbench2", TINY_LLAVA_VTBENCH2,
         "vtbench v2 model (LLaVA-1.5 geometry: CLIP 192px/8, 576 visual tokens, 16-layer Llama; tower 5.6 % of "
         "prefill FLOPs); random weights until trained, float32")


# OpenGVLab/InternVL3-8B-hf (model_type internvl): InternViT-300M-448px-V2_5 (24 layers,
# hidden 1024, ffn 4096, 16 heads, patch 14 at 448 px: 32x32 patches + CLS, q/k/v biases,
# LayerNorm, no QK norm, layer scale), pixel shuffle 0.5 (1024 -> 256 tokens of 4096 per
# tile), a LayerNorm + 4096 -> 3584 -> 3584 GELU projector, Qwen2.5-7B (28 layers, hidden
# 3584, ffn 18944, 28 heads, 4 KV heads, vocab 151674, rope_theta 1e6, untied head),
# image_token_id 151667 (<IMG_CONTEXT>), bfloat16. Its processor (GotOcr2 image processor,
# crop_to_patches forced on) cuts 1 to 12 tiles of 448 px plus a thumbnail. Checked
# (offline) against Ascend/MindSpeed-MM 2.3.0's examples/internvl3/model_8B.json, a
# training config of this checkpoint: image token 151667, 28 layers, width 3584, FFN
# 18944, 28 heads, 4 KV heads, q/k/v biases, vocab 151674, max positions 32768, RoPE base
# 1e6, RMS eps 1e-6, InternViT 24 layers, downsample 0.5; its InternViT-300M block
# (examples/qwen3vl_dev/model_internvit_qwen3.json): width 1024, FFN 4096, 16 heads,
# patch 14 at 448 px, q/k/v biases, no QK norm, LayerNorm eps 1e-6, GELU. That file (and
# the -hf 1B's config.json, hf-internal-testing/tiny-processor-internvl) carries a
# dynamic RoPE scaling of factor 2, left out here: it changes no count or FLOP. Not
# checked: max_patches 12 and the layer-scale / mean-pooling flags (from memory).
INTERNVL3_8B = {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "image_token_id": 151667,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vtdsl_preprocessor": {"crop_to_patches": True, "min_patches": 1, "max_patches": 12,
                           "size": {"height": 448, "width": 448}},
    "vision_config": {
        "model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 448, "patch_size": 14, "num_channels": 3, "attention_bias": True,
        "use_qk_norm": False, "norm_type": "layer_norm", "layer_norm_eps": 1e-06, "hidden_act": "gelu",
        "layer_scale_init_value": 0.1, "use_absolute_position_embeddings": True, "use_mean_pooling": True,
    },
    "text_config": {
        "model_type": "qwen2", "vocab_size": 151674, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "max_position_embeddings": 32768, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}
_builtin("internvl3-8b", INTERNVL3_8B,
         "InternVL3 8B (OpenGVLab/InternVL3-8B-hf): InternViT-300M 448-px tiles + pixel shuffle 0.5 + Qwen2.5-7B; "
         "counts per tile (256 visual tokens)")

# InternVL3's layout at tiny widths: 64-pixel tiles of 8x8 patches + CLS, pixel shuffle 0.5
# (16 tokens per tile), 1 to 6 tiles + a thumbnail, 4 ViT and 4 LLM layers; the rest is
# internvl3-8b's.
TINY_INTERNVL3 = {
    **copy.deepcopy(INTERNVL3_8B),
    "image_token_id": 250, "image_seq_length": 16, "torch_dtype": "float32",
    "vtdsl_preprocessor": {"crop_to_patches": True, "min_patches": 1, "max_patches": 6,
                           "size": {"height": 64, "width": 64}},
}
TINY_INTERNVL3["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=64, patch_size=8)
TINY_INTERNVL3["text_config"].update(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=2, torch_dtype="float32")
_builtin("tiny-internvl3", TINY_INTERNVL3,
         "tiny random InternVL3 (64-pixel tiles + CLS, pixel shuffle 0.5; 16 tokens per tile) for tests, float32")

# google/gemma-3-4b-it (model_type gemma3): SigLIP so400m at 896 px (27 layers, hidden
# 1152, ffn 4304, 16 heads, patch 14: 64x64 patches, no CLS, no pooling head), the
# projector's 4x4 average pool to mm_tokens_per_image 256, RMSNorm and one 1152 -> 2560
# matrix; Gemma 3 text: 34 layers, hidden 2560, ffn 10240 (gated tanh-GELU), 8 heads and 4
# KV heads of 256, query_pre_attn_scalar 256, every 6th layer global (RoPE theta 1e6, linear
# scaling 8) and the others sliding over 1024 tokens (theta 1e4), vocab 262208 with tied
# embeddings, image token 262144 (boi 255999, eoi 256000), bfloat16. Checked (offline)
# against a bf16 copy of the checkpoint's config.json (huggingface.co/mlx-community/
# gemma-3-4b-it-bf16: width 2560, FFN 10240, 34 layers, linear RoPE scaling 8 on the
# global layers, window 1024, the vision config, 256 tokens per image, ids 255999 /
# 256000 / 262144, eos [1, 106]) and KerasHub's published parameter counts
# (keras-team/keras-hub @ 00d9f10a, gemma3_presets.py: tests/test_gemma3.py matches
# them part by part). The rest are Gemma3TextConfig / SiglipVisionConfig defaults, as
# the hub file leaves them; preprocessor_config.json leaves pan-and-scan null: the
# processor's default, off (`vtdsl check --pan-and-scan` turns it on).
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
    "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vtdsl_preprocessor": {"do_pan_and_scan": None, "pan_and_scan_min_crop_size": None,
                           "pan_and_scan_max_num_crops": None, "pan_and_scan_min_ratio_to_activate": None},
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "image_size": 896, "patch_size": 14, "vision_use_head": False,
        # defaults, stated: num_channels 3, hidden_act gelu_pytorch_tanh, layer_norm_eps 1e-6
    },
    "text_config": {
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "query_pre_attn_scalar": 256, "sliding_window": 1024, "rms_norm_eps": 1e-06, "max_position_embeddings": 131072,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    },
}
_builtin("gemma-3-4b", GEMMA3_4B,
         "Gemma 3 4B (google/gemma-3-4b-it): SigLIP-896 pooled 4x4 to 256 tokens + Gemma 3 text (sliding-window "
         "and global layers, bidirectional image blocks); pan-and-scan off")

# Gemma 3's layout at tiny widths: 128-pixel images of 16x16 patches pooled 4x4 to 16
# tokens, 2 ViT layers, 4 LLM layers alternating sliding (window 16, shorter than the
# tests' prompts) and global; the rest (RoPE, norms, tied embeddings) is gemma-3-4b's.
TINY_GEMMA3 = {
    **copy.deepcopy(GEMMA3_4B), "mm_tokens_per_image": 16, "boi_token_index": 251, "eoi_token_index": 252,
    "image_token_index": 250, "torch_dtype": "float32",
}
TINY_GEMMA3["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=128, patch_size=8)
TINY_GEMMA3["text_config"].update(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                  sliding_window=16, max_position_embeddings=2048, bos_token_id=2, eos_token_id=1,
                                  pad_token_id=0, torch_dtype="float32",
                                  layer_types=["sliding_attention", "full_attention"] * 2)
_builtin("tiny-gemma3", TINY_GEMMA3,
         "tiny random Gemma 3 (128-pixel images pooled to 16 tokens, sliding window 16) for tests, float32")

# in the order `vtdsl models` lists them: full-size checkpoints, then the tiny test variants
BUILTINS: dict[str, tuple[dict, str]] = {name: _TABLE[name] for name in (
    "llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "llava-next-video-7b", "llava-onevision-qwen2-7b",
    "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "internvl3-8b", "gemma-3-4b", "smolvlm-2.2b",
    "tiny-llava", "tiny-llava-next", "tiny-llava-next-video", "tiny-llava-onevision", "tiny-qwen2-vl",
    "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl3", "tiny-gemma3", "tiny-smolvlm", "tiny-llava-vtbench2",
)}

# Other spellings users type for the same architectures.
ALIASES: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b",
    "llava-1.5-7b-hf": "llava-1.5-7b",
    "liuhaotian/llava-v1.5-7b": "llava-1.5-7b",
    "llava-hf/llava-1.5-13b-hf": "llava-1.5-13b",
    "llava-1.5-13b-hf": "llava-1.5-13b",
    "liuhaotian/llava-v1.5-13b": "llava-1.5-13b",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-next-7b",
    "llava-v1.6-vicuna-7b-hf": "llava-next-7b",
    "liuhaotian/llava-v1.6-vicuna-7b": "llava-next-7b",
    "llava-v1.6-vicuna-7b": "llava-next-7b",
    "qwen/qwen2.5-vl-7b-instruct": "qwen2.5-vl-7b",
    "qwen2.5-vl-7b-instruct": "qwen2.5-vl-7b",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b",
    "llava-onevision-qwen2-7b-ov-hf": "llava-onevision-qwen2-7b",
    "lmms-lab/llava-onevision-qwen2-7b-ov": "llava-onevision-qwen2-7b",
    "llava-onevision-7b": "llava-onevision-qwen2-7b",
    "llava-hf/llava-next-video-7b-hf": "llava-next-video-7b",
    "llava-next-video-7b-hf": "llava-next-video-7b",
    "qwen/qwen2-vl-7b-instruct": "qwen2-vl-7b",
    "qwen2-vl-7b-instruct": "qwen2-vl-7b",
    "qwen/qwen3-vl-8b-instruct": "qwen3-vl-8b",
    "qwen3-vl-8b-instruct": "qwen3-vl-8b",
    "huggingfacetb/smolvlm-instruct": "smolvlm-2.2b",
    "smolvlm-instruct": "smolvlm-2.2b",
    "opengvlab/internvl3-8b-hf": "internvl3-8b",
    "internvl3-8b-hf": "internvl3-8b",
}


def builtin_config_dict(name: str) -> dict:
    return copy.deepcopy(BUILTINS[name][0])


# ------------------------------------------------------------------ shipped specs
# Every built-in's ModelSpec as plain data, generated from the configs above by
# scripts/gen_builtin_specs.py (a test regenerates and compares). Reading it costs a JSON
# parse; building the specs costs importing transformers (and torch), seconds of CPU.
SHIPPED_SPECS = Path(__file__).resolve().parent / "data" / "builtin_specs.json"
# Fields a spec gets at run time, not from its config.
_RUNTIME_FIELDS = ("make_config", "source", "pretrained")


def spec_to_json(spec) -> dict:
    """A spec's fields as JSON values (tuples become lists)."""
    from dataclasses import asdict, fields

    return {f.name: _plain(getattr(spec, f.name)) if f.name not in ("vit", "llm") else asdict(getattr(spec, f.name))
            for f in fields(spec) if f.name not in _RUNTIME_FIELDS}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def specs_text(specs: dict[str, dict]) -> str:
    return json.dumps(specs, indent=1, sort_keys=True) + "\n"


def shipped_spec(name: str, config_from_dict):
    """The built-in `name`'s ModelSpec from the shipped data, its transformers config
    built only when asked for (`spec.config()`, `spec.build()`) by `config_from_dict` (the
    registry's reader, passed in: the registry imports this module, not the reverse)."""
    from functools import partial

    from .spec import ModelSpec, TowerDims

    data = _shipped()[name]
    kwargs = {key: _tuples(value) for key, value in data.items() if key not in ("vit", "llm")}
    return ModelSpec(vit=TowerDims(**data["vit"]), llm=TowerDims(**data["llm"]),
                     make_config=partial(_builtin_config, name, config_from_dict), **kwargs)


def _builtin_config(name: str, config_from_dict):
    return config_from_dict(builtin_config_dict(name))


_SHIPPED: dict[str, dict] = {}


def _shipped() -> dict[str, dict]:
    if not _SHIPPED:
        _SHIPPED.update(json.loads(SHIPPED_SPECS.read_text(encoding="utf-8")))
    return _SHIPPED
