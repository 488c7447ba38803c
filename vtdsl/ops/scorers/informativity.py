"""`informativity`: Turbo's information degree (arXiv:2407.11717), ViT only.

Turbo (anakin-skywalker-Joseph/Turbo, Code-BLIP/turbo/merge.py,
bipartite_unimodal_matching) splits the tokens entering a block, CLS first, into set A
(even places: CLS, patch 1, 3, ...) and set B (odd places: patch 0, 2, ...). An A token's
merge score is its mutual redundancy, the best cosine similarity of its keys (head mean)
to a B token's, minus its semantic value, 30·alpha times the attention CLS pays it (head
mean, softmax over all tokens); the r A tokens with the highest merge score merge away.

Here the score is the negative of that merge score for an A patch, so `keep informativity
top n` drops the same r = (patches - n) A patches; a B patch scores above every A patch
and is always kept. alpha is 5, the release's default (README, `eval_vqa.py --alphaval`).
The parity follows the tokens' current order (raster order, CLS first), which is Turbo's
order only before its first merge (Turbo then concatenates [unmerged A, B]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .attention import cls_attention
from .base import ScoreContext, ScorerInfo, ScoreSize, register

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["informativity"]

ALPHA = 5.0  # Turbo's released default (alpha 5, beta 1, gamma 0)
VALUE_SCALE = 30.0  # Turbo's fixed factor on alpha x CLS attention


def informativity(q_proj_out: Tensor, k_proj_out: Tensor, num_heads: int, alpha: float = ALPHA) -> Tensor:
    """``[B, n, H*dh]`` projections of one ViT layer (CLS at 0) -> float32 ``[B, n-1]``:
    for an A patch (odd patch index), minus (best cosine of its head-mean key to a B
    token's) plus 30·alpha x its CLS attention; for a B patch, one more than the highest
    A score."""
    import torch

    from ..attention import split_heads

    value = cls_attention(q_proj_out, k_proj_out, num_heads)  # [B, n-1]
    metric = split_heads(k_proj_out, num_heads).float().mean(1)  # [B, n, dh]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, 2::2], metric[:, 1::2]  # A patches (CLS, at place 0, is never a candidate), B patches
    redundancy = (a @ b.transpose(-1, -2)).max(dim=-1).values  # [B, |A| - 1]
    score_a = VALUE_SCALE * alpha * value[:, 1::2] - redundancy
    scores = torch.empty_like(value)
    scores[:, 1::2] = score_a
    top = score_a.max(dim=-1, keepdim=True).values if score_a.shape[-1] else torch.zeros_like(value[:, :1])
    scores[:, 0::2] = top + 1.0
    return scores


def _informativity(ctx: ScoreContext) -> Tensor:
    cap = ctx.captured
    return informativity(cap["q"], cap["k"], ctx.heads)


def _cost(obs: Any, size: ScoreSize) -> int:
    """The CLS row, ``2·n·width``, and the A x B cosines of head-mean keys, one head wide:
    ``2·|A|·|B|·head_width`` with A the patches at even places after CLS and B the odd ones."""
    a, b = (size.n - 1) // 2, size.n // 2
    return 2 * size.n * size.width + 2 * a * b * size.head_width


register(ScorerInfo(
    "informativity", ("vit",), canonical="informativity", queries={(): "cls"}, needs_cls=True, rank=75,
    attention=False, rope=False, cost=_cost, kernel=_informativity,
    summary="Turbo's information degree: CLS attention x 150 minus the best key similarity to the other "
            "half (A/B alternate tokens; the B half always ranks first; ViT only)",
))
