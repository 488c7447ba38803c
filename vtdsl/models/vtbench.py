"""`tiny-llava-vtbench`: a tiny LLaVA trained here on vtbench, shipped as package data.

No real VLM weights can be downloaded in our CI, and random weights make every pruning
method look alike, so this model gives pruning policies a real accuracy signal: its
attention is learned. Architecture (a LLaVA-1.5 in miniature):

- CLIP vision tower with CLS: image 96, patch 8 -> 12x12 = 144 patch tokens (+ CLS),
  hidden 96, MLP 384, 5 layers (the 5th is unused: feature layer -2), 4 heads;
  vision_feature_layer -2, strategy "default" (144 visual tokens enter the LLM);
- projector: Linear(96, 128) -> GELU -> Linear(128, 128);
- Llama decoder: hidden 128, 4 layers, 4 heads, 2 KV heads (GQA), SwiGLU 384;
- a word-level tokenizer over the vtbench vocabulary (`PreTrainedTokenizerFast`), a
  `CLIPImageProcessor` for 96-pixel images and a `LlavaProcessor` tying them together.

Training: ``examples/train_tiny_vlm.py`` (logic in `vtdsl.eval.train`); results and the
exact command are recorded in ``docs/vtbench.md``.

    from vtdsl.models.vtbench import load_tiny_vtbench, vtbench_spec
    model, processor = load_tiny_vtbench()
    spec = vtbench_spec()
"""

from __future__ import annotations

from typing import Any

from .spec import ModelSpec

from .shipped import SHIPPED_DIRS, VTBENCH, VTBENCH2, trained_dir  # noqa: F401 (re-exported)

NAME = VTBENCH
DATA_DIR = SHIPPED_DIRS[NAME]
NAME2 = VTBENCH2  # vtbench v2's model: the default of `eval`, `show` and the accuracy objective
DATA_DIR2 = SHIPPED_DIRS[NAME2]
DEFAULT_MODEL = NAME2

IMAGE_SIZE = 96
PATCH_SIZE = 8
# CLIP's normalisation constants (as in openai/clip-vit-*).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Architecture hyper-parameters (vocab size and special ids are filled from the tokenizer).
VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4)
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4)
MAX_POSITIONS = 256


def make_config(vocab_size: int, image_token_id: int, pad_token_id: int = 0,
                bos_token_id: int = 2, eos_token_id: int = 3, **overrides: Any):
    """The `LlavaConfig` of tiny-llava-vtbench (`overrides` patch VISION / TEXT keys as
    ``vision_<key>`` / ``text_<key>``, for experiments)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = dict(VISION)
    text = dict(TEXT)
    for key, value in overrides.items():
        if key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        elif key.startswith("text_"):
            text[key[len("text_"):]] = value
        else:
            raise TypeError(f"unknown override {key!r}")
    vision_config = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
                                     hidden_act="quick_gelu", **vision)
    text_config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=MAX_POSITIONS,
                              hidden_act="silu", tie_word_embeddings=False,
                              pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                              eos_token_id=eos_token_id, **text)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_id=image_token_id, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
                         tie_word_embeddings=False)
    config.pad_token_id = pad_token_id
    return config


def load_config():
    """The shipped config (offline, from package data)."""
    from transformers import LlavaConfig

    return LlavaConfig.from_pretrained(DATA_DIR)


def vtbench_spec() -> ModelSpec:
    """`ModelSpec` of tiny-llava-vtbench, read from the shipped config."""
    description = ("tiny LLaVA (CLIP 96px/8 + Llama) trained on vtbench; "
                   "144 visual tokens; real accuracy signal on CPU")
    config = load_config()
    from dataclasses import replace

    from .registry import spec_from_config

    return replace(spec_from_config(config), name=NAME, description=description, make_config=load_config,
                   source=str(DATA_DIR), pretrained=True)


def load_processor(name: str = NAME):
    """`LlavaProcessor` (word-level tokenizer + CLIPImageProcessor), offline."""
    from transformers import LlavaProcessor

    return LlavaProcessor.from_pretrained(SHIPPED_DIRS[name])


def load_tiny_vtbench(device: str = "cpu", dtype: Any = None, name: str = NAME):
    """Load (model, processor) of a shipped vtbench model from package data; no network.
    `processor.tokenizer` is the word-level tokenizer (left padding). Weights are float32
    (v1 about 5.7 MB, v2 13.6 MB)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(
        SHIPPED_DIRS[name], dtype=dtype or torch.float32, local_files_only=True)
    model.to(device).eval()
    return model, load_processor(name)


def register_shipped() -> None:
    """Register `tiny-llava-vtbench` when its trained files are in the package (a source
    checkout without them still imports; `vtdsl eval` then says how to train it)."""
    if (DATA_DIR / "config.json").is_file():
        from .registry import register_spec

        register_spec(NAME, vtbench_spec)
