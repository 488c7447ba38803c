"""`global_attn`: VFlowOpt's importance map (arXiv:2508.05211), ViT only.

VFlowOpt (sihany077/VFlowOpt, src/LLaVA-OneVision/llava/model/multimodal_encoder/
siglip_encoder.py, SigLipEncoderLayer.forward) reads one ViT layer's attention, averaged
over heads: the attention each token receives (mean over all query rows); the "global"
tokens, those receiving more than t times the mean; and the map, the mean of the global
tokens' attention rows. t is the released 10 % setting's 39.26 (its entropy term,
`illava_vit_alpha_v`, is 0 in every released setting, so it is left out).

With no global token VFlowOpt's mean is empty (NaN scores); here every row counts then,
so the map falls back to the attention received. The CLS token can be global (its row
is read), never a candidate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import ScoreContext, ScorerInfo, ScoreSize, register

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["global_attention"]

THRESHOLD = 39.26492840997221  # illava_vit_t of the released 10 % setting


def global_attention(q_proj_out: Tensor, k_proj_out: Tensor, num_heads: int, t: float = THRESHOLD) -> Tensor:
    """``[B, n, H*dh]`` projections of one ViT layer -> float32 ``[B, n]``: the head-mean
    attention rows of the tokens that receive more than t x the mean attention, averaged."""
    from ..attention import attention_probs, split_heads

    probs = attention_probs(split_heads(q_proj_out, num_heads), split_heads(k_proj_out, num_heads))  # [B, n, n]
    received = probs.mean(1)
    rows = received > t * received.mean(-1, keepdim=True)
    rows = rows | ~rows.any(-1, keepdim=True)  # no global token: every row
    weights = rows.float() / rows.sum(-1, keepdim=True)
    return (weights.unsqueeze(1) @ probs)[:, 0]


def _global_attn(ctx: ScoreContext) -> Tensor:
    cap = ctx.captured
    return global_attention(cap["q"], cap["k"], ctx.heads)[:, ctx.lead:]


def _cost(obs: Any, size: ScoreSize) -> int:
    """Every query row against every key, ``2·n²·width``, and the rows' weighted mean,
    ``2·n²``."""
    return 2 * size.n * size.n * size.width + 2 * size.n * size.n


register(ScorerInfo(
    "global_attn", ("vit",), canonical="global_attn", queries={(): "all"}, rank=85,
    attention=False, rope=False, cost=_cost, kernel=_global_attn,
    summary="VFlowOpt's importance map: the mean attention row of the tokens that receive over 39.26 x the "
            "mean attention (head mean; all rows if none; ViT only)",
))
