"""Value scores (FlowCut, ViT only): `vnorm` (the value's norm) and `vsim` (the CLS value's
similarity to each value)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import ScoreContext, ScorerInfo, ScoreSize, register

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["value_norm", "value_similarity"]


def value_norm(v_proj_out: Tensor, num_heads: int) -> Tensor:
    """L1 norm of each token's value averaged over heads (FlowCut's value norm).

    ``v_proj_out`` ``[B, n, H*dh]`` -> float32 ``[B, n]``: ``Σ_c |mean_h v[h, c]|``. No
    matmul.
    """
    from ..attention import split_heads

    v = split_heads(v_proj_out, num_heads).float()  # [B, H, n, dh]
    return v.mean(1).abs().sum(-1)


def value_similarity(v_proj_out: Tensor, num_heads: int) -> Tensor:
    """FlowCut's semantic attention: per head, the softmax over all n tokens of the CLS
    value's dot product with every value (unscaled), averaged over heads; patch columns.

    ``v_proj_out`` ``[B, n, H*dh]`` (CLS at 0) -> float32 ``[B, n-1]``. One matmul
    ``[1, dh] x [dh, n]`` per head: ``2·n·H·dh`` FLOPs per image.
    """
    import torch

    from ..attention import split_heads

    v = split_heads(v_proj_out, num_heads).float()  # [B, H, n, dh]
    logits = torch.matmul(v[:, :, :1], v.transpose(-1, -2))  # [B, H, 1, n]
    return torch.softmax(logits, dim=-1).mean(1)[:, 0, 1:]


def _vnorm(ctx: ScoreContext) -> Tensor:
    return value_norm(ctx.captured["v"], ctx.heads)[:, ctx.lead:]


def _vsim(ctx: ScoreContext) -> Tensor:
    return value_similarity(ctx.captured["v"], ctx.heads)


def _vsim_cost(obs: Any, size: ScoreSize) -> int:
    return 2 * size.n * size.width  # the CLS value against all n values


register(
    ScorerInfo(
        "vnorm", ("vit",), canonical="vnorm", queries={(): "none"}, rank=60,
        projections=("v",), attention=False, rope=False,
        summary="L1 norm of the token's value averaged over heads (FlowCut; ViT only)", kernel=_vnorm,
    ),
    ScorerInfo(
        "vsim", ("vit",), canonical="vsim", queries={(): "cls"}, rank=70,
        projections=("v",), attention=False, rope=False, needs_cls=True,
        summary="softmax of the CLS value's dot product with the token's value, head mean "
                "(FlowCut's semantic attention; ViT only)", cost=_vsim_cost, kernel=_vsim,
    ),
)
