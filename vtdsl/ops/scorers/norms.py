"""Norm scores: `norm` (the hidden state) and `knorm` (the attention key, DART's pivots).

No matmul: nothing counted (`docs/dev/contracts.md`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .attention import llm_keys
from .base import ScoreContext, ScorerInfo, register

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["token_norm"]


def token_norm(h: Tensor, *, p: float = 2.0) -> Tensor:
    """Per-token vector norm (L2 by default; ``p=1`` is DART's key-norm pivot criterion).

    Parameters
    ----------
    h : Tensor
        ``[B, n, d]`` hidden states / keys.
    p : float
        Norm order.

    Returns
    -------
    Tensor
        float32 ``[B, n]``. No counted FLOPs.
    """
    import torch

    return torch.linalg.vector_norm(h.float(), ord=p, dim=-1)


def _norm(ctx: ScoreContext) -> Tensor:
    return token_norm(ctx.captured["h"])[:, ctx.lead:]


def _knorm(ctx: ScoreContext) -> Tensor:
    if ctx.obs.tower == "vit":  # the key projection, all heads
        return ctx.captured["k"].float().abs().sum(-1)[:, ctx.lead:]
    k, _, _ = llm_keys(ctx)  # the key as the cache holds it, all heads
    return k.float().abs().sum((1, 3))


register(
    ScorerInfo(
        "norm", ("vit", "llm"), canonical="norm", queries={(): "none"}, rank=40,
        projections=(), attention=False, rope=False,
        summary="L2 norm of the token's hidden state", kernel=_norm,
    ),
    ScorerInfo(
        "knorm", ("vit", "llm"), canonical="knorm", queries={(): "none"}, rank=50,
        projections=("k",), attention=False, keys_match=True, on_input=False,
        summary="L1 norm of the token's attention key over all heads (LLM: with RoPE, as cached, "
                "unless no_rope); DART's pivots", kernel=_knorm,
    ),
)
