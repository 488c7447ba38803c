"""Per-token importance scores: attention from a query set, and token norms.

Every attention scorer issues exactly one matmul, of the query rows it needs against all
keys (``2·m·n·H·dh`` FLOPs per image, `docs/dev/contracts.md`): ``cls`` uses one row,
``attention_received`` all n rows, and `query_attention` whatever rows it is given. Scores
are float32, ``[B, n]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .attention import HeadReduce, attention_probs, reduce_heads, split_heads

QueryReduce = Literal["mean", "sum", "max"]

__all__ = ["cls_attention", "attention_received", "query_attention", "token_norm", "value_norm", "value_similarity",
           "text_raters"]


def _reduce_queries(probs: Tensor, how: QueryReduce) -> Tensor:
    if how == "mean":
        return probs.mean(dim=1)
    if how == "sum":
        return probs.sum(dim=1)
    if how == "max":
        return probs.amax(dim=1)
    raise ValueError(f"query_reduce must be 'mean', 'sum' or 'max', got {how!r}")


def _columns(scores: Tensor, key_index: Tensor | slice | None) -> Tensor:
    """Select key columns from ``[B, n]``: a slice, ``[nk]`` or per-sample ``[B, nk]``."""
    if key_index is None:
        return scores
    if isinstance(key_index, slice):
        return scores[:, key_index]
    key_index = key_index.to(scores.device)
    if key_index.dim() == 1:
        return scores.index_select(1, key_index)
    return scores.gather(1, key_index)


def _key_mask(key_index: Tensor | slice, b: int, n: int, device: torch.device) -> Tensor:
    """Boolean ``[B, 1, 1, n]`` mask that is True on the selected key columns."""
    allowed = torch.zeros(b, n, dtype=torch.bool, device=device)
    if isinstance(key_index, slice):
        allowed[:, key_index] = True
    else:
        key_index = key_index.to(device)
        if key_index.dim() == 1:
            allowed[:, key_index] = True
        else:
            allowed.scatter_(1, key_index, True)
    return allowed[:, None, None, :]


def query_attention(
    q_rows: Tensor,
    k: Tensor,
    key_index: Tensor | slice | None = None,
    *,
    mask: Tensor | None = None,
    query_positions: Tensor | None = None,
    head_reduce: HeadReduce = "mean",
    query_reduce: QueryReduce = "mean",
    softmax_over: Literal["all", "selected"] = "all",
    scale: float | None = None,
    head_columns: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> Tensor:
    """Attention from given query rows to given key columns, reduced over heads and queries.

    Parameters
    ----------
    q_rows : Tensor
        ``[B, H, m, dh]``: only the query rows the score reads (e.g. the last text
        position, ``m = 1``), RoPE applied.
    k : Tensor
        ``[B, Hkv, n, dh]``: all keys of the layer, RoPE applied; ``Hkv`` may divide ``H``.
    key_index : Tensor or slice, optional
        Key columns to return: ``[nk]`` shared, ``[B, nk]`` per sample, or a slice.
        None returns all n columns.
    mask : Tensor, optional
        Extra mask for `attention_probs` (boolean True = may attend, or additive).
    query_positions : Tensor, optional
        ``[m]`` or ``[B, m]`` sequence positions of the query rows; when given, key ``j``
        is visible to a query at position ``p`` only if ``j <= p`` (causal LLM attention,
        so text before the image contributes zeros to the image columns).
    head_reduce, query_reduce : {"mean", "sum", "max"}
        Reductions over heads, then over the query rows. `head_reduce` may also be an
        int h: the h heads with the most attention on `head_columns` (``[B, n]`` bool;
        None = every key), summed over the rows (`attention.reduce_heads`).
    softmax_over : {"all", "selected"}
        ``"all"``: softmax over every key (what the model computes). ``"selected"``:
        softmax restricted to the ``key_index`` columns (FEATHER-style criterion).
    scale : float, optional
        Logit scale; default ``1/sqrt(dh)``.
    query_mask : Tensor, optional
        ``[B, m]`` bool: only these query rows count (SparseVLM's raters); the rows are
        still all computed, so the cost does not depend on the data. `query_reduce` must
        be ``"mean"``; the heads of an int `head_reduce` are ranked on these rows.

    Returns
    -------
    Tensor
        float32 ``[B, nk]``.
    """
    b, _, m, _ = q_rows.shape
    n = k.shape[2]
    masks: list[Tensor] = []
    if query_positions is not None:
        qp = query_positions.to(q_rows.device)
        if qp.dim() == 1:
            qp = qp[None].expand(b, m)
        keys = torch.arange(n, device=q_rows.device)
        masks.append((keys[None, None, :] <= qp[:, :, None])[:, None])  # [B, 1, m, n]
    if softmax_over == "selected":
        if key_index is None:
            raise ValueError("softmax_over='selected' needs key_index")
        masks.append(_key_mask(key_index, b, n, q_rows.device))
    elif softmax_over != "all":
        raise ValueError(f"softmax_over must be 'all' or 'selected', got {softmax_over!r}")

    if masks:
        combined = masks[0]
        for extra in masks[1:]:
            combined = combined & extra
        if mask is None:
            mask = combined
        elif mask.dtype == torch.bool:
            mask = mask & combined
        else:
            mask = mask.float().masked_fill(~combined, float("-inf"))

    if query_mask is None:
        probs = attention_probs(q_rows, k, mask=mask, head_reduce=head_reduce, scale=scale, head_columns=head_columns)
        return _columns(_reduce_queries(probs, query_reduce), key_index)
    if query_reduce != "mean":
        raise ValueError("query_mask averages the rows it keeps: query_reduce must be 'mean'")
    weight = query_mask.to(torch.float32)
    probs = attention_probs(q_rows, k, mask=mask, head_reduce=None, scale=scale) * weight[:, None, :, None]
    reduced = reduce_heads(probs, head_reduce, head_columns=head_columns)  # [B, m, n]
    return _columns(reduced.sum(1) / weight.sum(1, keepdim=True).clamp(min=1), key_index)


def cls_attention(
    q_proj_out: Tensor,
    k_proj_out: Tensor,
    num_heads: int,
    *,
    head_reduce: HeadReduce = "mean",
) -> Tensor:
    """Attention of the CLS token (position 0) over the patch tokens.

    Parameters
    ----------
    q_proj_out, k_proj_out : Tensor
        ``[B, n, H*dh]`` outputs of the layer's ``q_proj`` / ``k_proj`` (CLS at 0).
    num_heads : int
        Attention heads ``H``.
    head_reduce : {"mean", "sum", "max"} or int
        Head reduction. VisionZip sums heads; ``"mean"`` is the same ranking divided by H.
        An int h: the h heads that give the patches the most attention.

    Returns
    -------
    Tensor
        float32 ``[B, n-1]``: the CLS row of the softmax over all n keys (CLS
        included), patch columns only.

    Notes
    -----
    One matmul ``[1, dh] x [dh, n]`` per head: ``2·n·H·dh`` FLOPs per image.
    """
    q = split_heads(q_proj_out[:, :1], num_heads)
    k = split_heads(k_proj_out, num_heads)
    patches = None
    if not isinstance(head_reduce, str):  # heads ranked by their attention on the patches
        patches = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device)
        patches[:, 0] = False
    probs = attention_probs(q, k, head_reduce=head_reduce, head_columns=patches)  # [B, 1, n]
    return probs[:, 0, 1:]


def attention_received(
    q_proj_out: Tensor,
    k_proj_out: Tensor,
    num_heads: int,
    *,
    key_index: Tensor | slice | None = None,
    head_reduce: HeadReduce = "mean",
) -> Tensor:
    """Attention each token receives: mean over heads and over all n queries (HiPrune).

    Parameters
    ----------
    q_proj_out, k_proj_out : Tensor
        ``[B, n, H*dh]`` projection outputs of one (ViT) layer.
    num_heads : int
        Attention heads ``H``.
    key_index : Tensor or slice, optional
        Columns to return (e.g. ``slice(1, None)`` for the patches of a CLS tower).
    head_reduce : {"mean", "sum", "max"} or int
        Head reduction (default mean); an int h ranks heads on the `key_index` columns.

    Returns
    -------
    Tensor
        float32 ``[B, n]`` (or ``[B, nk]`` with ``key_index``).

    Notes
    -----
    One matmul ``[n, dh] x [dh, n]`` per head: ``2·n²·H·dh`` FLOPs per image.
    """
    q = split_heads(q_proj_out, num_heads)
    k = split_heads(k_proj_out, num_heads)
    columns = None
    if key_index is not None and not isinstance(head_reduce, str):  # heads ranked on the returned keys
        columns = _key_mask(key_index, q.shape[0], k.shape[2], q.device)[:, 0, 0]
    return query_attention(q, k, key_index, head_reduce=head_reduce, query_reduce="mean", head_columns=columns)


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
    return torch.linalg.vector_norm(h.float(), ord=p, dim=-1)


def value_norm(v_proj_out: Tensor, num_heads: int) -> Tensor:
    """L1 norm of each token's value averaged over heads (FlowCut's value norm).

    ``v_proj_out`` ``[B, n, H*dh]`` -> float32 ``[B, n]``: ``Σ_c |mean_h v[h, c]|``. No
    matmul.
    """
    v = split_heads(v_proj_out, num_heads).float()  # [B, H, n, dh]
    return v.mean(1).abs().sum(-1)


def value_similarity(v_proj_out: Tensor, num_heads: int) -> Tensor:
    """FlowCut's semantic attention: per head, the softmax over all n tokens of the CLS
    value's dot product with every value (unscaled), averaged over heads; patch columns.

    ``v_proj_out`` ``[B, n, H*dh]`` (CLS at 0) -> float32 ``[B, n-1]``. One matmul
    ``[1, dh] x [dh, n]`` per head: ``2·n·H·dh`` FLOPs per image.
    """
    v = split_heads(v_proj_out, num_heads).float()  # [B, H, n, dh]
    logits = torch.matmul(v[:, :, :1], v.transpose(-1, -2))  # [B, H, 1, n]
    return torch.softmax(logits, dim=-1).mean(1)[:, 0, 1:]


def text_raters(visual: Tensor, text: Tensor, candidates: Tensor) -> Tensor:
    """SparseVLM's raters: the candidate text tokens most relevant to the image.

    Each visual token's softmax over the candidates of its dot products with them
    (``softmax(v · tᵀ)``), averaged over the visual tokens, rates every candidate; the
    raters are the candidates rated above their mean (all of them when none is).

    Parameters
    ----------
    visual : Tensor
        ``[B, V, d]`` visual tokens as the LLM receives them (its input embeddings).
    text : Tensor
        ``[B, T, d]`` text tokens, the same way.
    candidates : Tensor
        ``[B, T]`` bool: the text tokens that may rate (SparseVLM: those after the image).

    Returns
    -------
    Tensor
        ``[B, T]`` bool.

    Notes
    -----
    One ``bmm`` of the visual tokens against every text token, candidates or not, so the
    cost is ``2·V·T·d`` whatever the prompt; float32.
    """
    logits = torch.bmm(visual.float(), text.float().transpose(1, 2))  # [B, V, T]
    logits = logits.masked_fill(~candidates[:, None, :], float("-inf"))
    rating = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0).mean(1)  # [B, T]
    count = candidates.sum(1, keepdim=True).clamp(min=1)
    mean = (rating * candidates).sum(1, keepdim=True) / count
    raters = candidates & (rating > mean)
    return torch.where(raters.any(1, keepdim=True), raters, candidates)
