"""Attention probabilities recomputed from captured query/key projections.

Scores never need eager attention: a forward hook captures the outputs of a layer's
`q_proj` / `k_proj`, and the rows a scorer needs are recomputed here with exactly one
matmul of the needed query rows against all keys (`2·m·n·H·dh` FLOPs, see
`docs/dev/contracts.md`). Everything after that matmul (scale, mask, softmax, head
reduction) is elementwise and therefore free in the cost model.

Shapes: ``B`` batch, ``H`` query heads, ``Hkv`` key heads, ``m`` query rows, ``n`` keys,
``dh`` head width.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch
from torch import Tensor

HeadReduce = Union[Literal["mean", "sum", "max"], int]

__all__ = ["split_heads", "repeat_kv", "attention_probs", "reduce_heads", "reduce_plain", "PLAIN_REDUCTIONS"]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """Split a projection output into heads.

    Parameters
    ----------
    x : Tensor
        ``[B, n, H*dh]`` output of a ``q_proj`` / ``k_proj`` linear layer.
    num_heads : int
        Number of heads ``H`` the width is split into.

    Returns
    -------
    Tensor
        ``[B, H, n, dh]`` view (no copy) of ``x``.
    """
    if x.dim() != 3:
        raise ValueError(f"split_heads expects [B, n, H*dh], got shape {tuple(x.shape)}")
    b, n, width = x.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads={num_heads}")
    return x.view(b, n, num_heads, width // num_heads).transpose(1, 2)


def repeat_kv(k: Tensor, n_rep: int) -> Tensor:
    """Repeat key/value heads for grouped-query attention.

    Query head ``h`` reads key head ``h // n_rep`` (the transformers convention).

    Parameters
    ----------
    k : Tensor
        ``[B, Hkv, n, dh]``.
    n_rep : int
        Query heads per key head.

    Returns
    -------
    Tensor
        ``[B, Hkv*n_rep, n, dh]``; ``k`` itself when ``n_rep == 1``.
    """
    if n_rep < 1:
        raise ValueError(f"n_rep must be >= 1, got {n_rep}")
    if n_rep == 1:
        return k
    b, hkv, n, dh = k.shape
    return k[:, :, None].expand(b, hkv, n_rep, n, dh).reshape(b, hkv * n_rep, n, dh)


PLAIN_REDUCTIONS = ("mean", "sum", "max")


def reduce_plain(x: Tensor, how: str, dim: int = 1) -> Tensor:
    """`x` reduced over `dim` by one of `PLAIN_REDUCTIONS` (heads here, query rows in the
    attention scorers)."""
    if how == "mean":
        return x.mean(dim=dim)
    if how == "sum":
        return x.sum(dim=dim)
    if how == "max":
        return x.amax(dim=dim)
    raise ValueError(f"expected one of {PLAIN_REDUCTIONS}, got {how!r}")


def reduce_heads(probs: Tensor, how: HeadReduce = "mean", *, head_columns: Tensor | None = None) -> Tensor:
    """Reduce ``[B, H, m, n]`` attention over the head dimension (1).

    ``how``: ``"mean"``, ``"sum"``, ``"max"``, or an int h: the mean over the h heads
    whose attention on the `head_columns` keys (``[B, n]`` bool; None = every key),
    summed over all query rows, is largest — chosen per sample (SparseVLM v2's head
    selection, which picks the heads per layer from their total mass on the image).
    """
    if how in PLAIN_REDUCTIONS:
        return reduce_plain(probs, how)
    if isinstance(how, int) and not isinstance(how, bool) and 1 <= how <= probs.shape[1]:
        if head_columns is None:
            mass = probs.sum(dim=(2, 3))
        else:
            mass = (probs * head_columns[:, None, None, :].to(probs.dtype)).sum(dim=(2, 3))
        heads = mass.topk(how, dim=1).indices  # [B, h]
        index = heads[:, :, None, None].expand(-1, -1, *probs.shape[2:])
        return probs.gather(1, index).mean(dim=1)
    raise ValueError(f"head_reduce must be 'mean', 'sum', 'max' or a head count 1..{probs.shape[1]}, got {how!r}")


def attention_probs(q: Tensor, k: Tensor, *, mask: Tensor | None = None, head_reduce: HeadReduce | None = "mean",
                    scale: float | None = None, head_columns: Tensor | None = None) -> Tensor:
    """Softmax attention of query rows over keys, reduced over heads.

    Parameters
    ----------
    q : Tensor
        ``[B, H, m, dh]`` query rows (RoPE already applied by the caller in the LLM).
    k : Tensor
        ``[B, Hkv, n, dh]`` keys, RoPE applied. ``Hkv`` may divide ``H`` (grouped-query
        attention): the grouping is done by reshaping the queries, so keys are never
        copied and the FLOPs stay ``2·m·n·H·dh``.
    mask : Tensor, optional
        Broadcastable to ``[B, H, m, n]`` (typically ``[B, 1, m, n]``). Boolean: ``True``
        = may attend (the ``torch.nn.functional.scaled_dot_product_attention``
        convention). Floating: added to the logits (the transformers convention).
        A row whose keys are all masked out (boolean ``False`` or ``-inf``) yields
        all-zero probabilities, not NaN.
    head_reduce : {"mean", "sum", "max"}, int or None
        How heads are combined (an int h: the mean of the h heads with the most mass on
        `head_columns`, see `reduce_heads`); ``None`` keeps them.
    scale : float, optional
        Logit scale; default ``1/sqrt(dh)``.
    head_columns : Tensor, optional
        ``[B, n]`` bool: the keys whose attention ranks heads for an int `head_reduce`.

    Returns
    -------
    Tensor
        float32 ``[B, m, n]`` (or ``[B, H, m, n]`` when ``head_reduce`` is None).

    Notes
    -----
    Exactly one ``torch.matmul`` is issued (the logits); scale, mask and softmax run in
    float32 whatever the input dtype.
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D [B, H, *, dh], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, m, dh = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dh:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head width")
    if hkv < 1 or h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key heads ({hkv})")
    group = h // hkv
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)

    # Heads h = g*group + r share key head g: fold the group into the query rows.
    qg = q.float().reshape(b, hkv, group * m, dh)
    logits = torch.matmul(qg, k.float().transpose(-1, -2)).view(b, h, m, n) * scale

    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.float()
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows
    if head_reduce is None:
        return probs
    return reduce_heads(probs, head_reduce, head_columns=head_columns)
