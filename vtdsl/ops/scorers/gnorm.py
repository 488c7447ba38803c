"""`gnorm`: the L2 norm of a token as the next layer's attention reads it, i.e. after that
layer's input norm (LLM `input_layernorm`, CLIP `layer_norm1`, Qwen-VL vision blocks `norm1`,
InternViT `layernorm_before`).

A score read at layer ℓ (`gnorm@llm.layerℓ`, or `gnorm` in a stage at layer ℓ+1) takes
layer ℓ's output hidden state, the tensor `norm` reads, and applies the input norm of
layer ℓ+1, the layer that consumes it: ``‖input_norm_{ℓ+1}(h_ℓ)‖₂``. In a stage at layer
N that is the norm of the tokens entering N as N's own attention sees them; at layer 0,
the embeddings through layer 0's input norm. Unlike `norm`, it weighs each channel by the
norm's gain (and shifts it by CLIP's bias), so the tokens that dominate the next
attention rank first. No matmul: nothing counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ScoreContext, ScorerInfo, register
from .norms import token_norm

if TYPE_CHECKING:
    from torch import Tensor

# Where a layer keeps its input norm: LLaMA-style decoders, CLIP encoder layers, Qwen-VL
# vision blocks, InternViT layers (RMSNorm / LayerNorm before their attention).
_INPUT_NORMS = ("input_layernorm", "layer_norm1", "norm1", "layernorm_before")


def _input_norm(layer):
    for name in _INPUT_NORMS:
        norm = getattr(layer, name, None)
        if norm is not None:
            return norm
    raise ValueError(f"'gnorm' found no input norm ({' or '.join(_INPUT_NORMS)}) on {type(layer).__name__}")


def _check(obs, spec) -> str | None:
    tower = spec.vit if obs.tower == "vit" else spec.llm
    if obs.layer + 1 < tower.layers:
        return None
    name = "vision tower" if obs.tower == "vit" else "LLM"
    return (f"'gnorm' at {obs.tower}.layer{obs.layer} applies the input norm of the next layer, and "
            f"{spec.name}'s {name} has no layer {obs.layer + 1}")


def _gnorm(ctx: ScoreContext) -> Tensor:
    norm = _input_norm(ctx.layer(ctx.obs.layer + 1))
    return token_norm(norm(ctx.captured["h"]))[:, ctx.lead:]


register(ScorerInfo(
    "gnorm", ("vit", "llm"), canonical="gnorm", queries={(): "none"}, rank=45,
    projections=(), attention=False, rope=False, check=_check, kernel=_gnorm,
    summary="L2 norm of the token's hidden state after the next layer's input norm (what that layer's "
            "attention reads)",
))
