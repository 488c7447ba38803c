"""What the passes, the cost model and the compiler need to know about a model.

A `ModelSpec` is plain data derived from a transformers config. Everything family
specific (CLS token or not, a 2x2 patch merger, anyres crops, M-RoPE) is a field here, so
the IR passes and the cost model never branch on the model's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class TowerDims:
    """Shape of a transformer stack, enough for analytic FLOPs and KV bytes."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    # "gelu" MLPs have two matmuls (fc1, fc2); "swiglu" have three (gate, up, down).
    mlp: Literal["gelu", "swiglu"] = "gelu"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Literal["llava"]  # later: "llava-next", "qwen2.5-vl"
    description: str
    vit: TowerDims
    llm: TowerDims
    vocab_size: int
    image_size: int
    patch_size: int
    channels: int
    has_cls: bool
    vision_feature_layer: int  # as in the HF config, e.g. -2
    select_strategy: Literal["default", "full"]
    projector: tuple[int, ...]  # widths of the projector's linear layers, input first
    dtype: str = "float16"
    # Where sites live in the HF module tree ({i} = layer index).
    vit_layer_path: str = "model.vision_tower.encoder.layers.{i}"
    projector_path: str = "model.multi_modal_projector"
    llm_layer_path: str = "model.language_model.layers.{i}"
    # Builds the transformers config; kept as a callable so importing the registry is free.
    make_config: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def patch_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def vit_tokens(self) -> int:
        """Tokens the ViT layers see: patches plus CLS when the tower has one."""
        return self.patch_tokens + (1 if self.has_cls else 0)

    @property
    def feature_layer_index(self) -> int:
        """Index of the ViT layer whose output becomes the image features."""
        return self.vision_feature_layer % (self.vit.layers + 1) - 1

    @property
    def image_tokens(self) -> int:
        """Visual tokens entering the LLM per image when nothing is pruned."""
        keeps_cls = self.has_cls and self.select_strategy == "full"
        return self.patch_tokens + (1 if keeps_cls else 0)

    @property
    def dtype_bytes(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
