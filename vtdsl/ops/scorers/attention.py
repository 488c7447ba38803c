"""Attention scores: `cls`, `attn`, `text` and HiPrune's `anchors` / `registers`.

Every attention scorer issues exactly one matmul, of the query rows it needs against all
keys (``2·m·n·H·dh`` FLOPs per image, `docs/dev/contracts.md`): ``cls`` uses one row,
``attention_received`` all n rows, and `query_attention` whatever rows it is given. Scores
are float32, ``[B, n]``.

torch is imported inside the functions: the torch-free front end imports this module for
its entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from .base import ScoreContext, ScorerInfo, ScoreSize, register

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ..attention import HeadReduce

QueryReduce = Literal["mean", "sum", "max"]

__all__ = ["cls_attention", "attention_received", "query_attention", "text_raters", "apply_rope", "llm_keys"]


def _reduce_queries(probs: Tensor, how: QueryReduce) -> Tensor:
    from ..attention import PLAIN_REDUCTIONS, reduce_plain

    if how not in PLAIN_REDUCTIONS:
        raise ValueError(f"query_reduce must be 'mean', 'sum' or 'max', got {how!r}")
    return reduce_plain(probs, how)


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
    import torch

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


def restrict_mask(mask: Tensor | None, allowed: Tensor) -> Tensor:
    """`mask` (None, boolean, or additive float) narrowed to the `allowed` keys, in the
    form the caller passed: a boolean stays boolean, an additive mask gets -inf."""
    import torch

    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.float().masked_fill(~allowed, float("-inf"))


def _query_masks(q_rows: Tensor, n: int, key_index, query_positions, softmax_over: str) -> list[Tensor]:
    """The boolean masks `query_attention` adds: causality of the query rows, and the
    selected key columns when the softmax runs over them only."""
    import torch

    b, _, m, _ = q_rows.shape
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
    return masks


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
    import torch

    from ..attention import attention_probs, reduce_heads

    masks = _query_masks(q_rows, k.shape[2], key_index, query_positions, softmax_over)
    if masks:
        combined = masks[0]
        for extra in masks[1:]:
            combined = combined & extra
        mask = restrict_mask(mask, combined)

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
    import torch

    from ..attention import attention_probs, split_heads

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
    from ..attention import split_heads

    q = split_heads(q_proj_out, num_heads)
    k = split_heads(k_proj_out, num_heads)
    columns = None
    if key_index is not None and not isinstance(head_reduce, str):  # heads ranked on the returned keys
        columns = _key_mask(key_index, q.shape[0], k.shape[2], q.device)[:, 0, 0]
    return query_attention(q, k, key_index, head_reduce=head_reduce, query_reduce="mean", head_columns=columns)


def text_raters(visual: Tensor, text: Tensor, candidates: Tensor) -> Tensor:
    """SparseVLM's raters (`text(raters)`): the candidate text tokens most relevant to the image.

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
    import torch

    logits = torch.bmm(visual.float(), text.float().transpose(1, 2))  # [B, V, T]
    logits = logits.masked_fill(~candidates[:, None, :], float("-inf"))
    rating = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0).mean(1)  # [B, T]
    count = candidates.sum(1, keepdim=True).clamp(min=1)
    mean = (rating * candidates).sum(1, keepdim=True) / count
    raters = candidates & (rating > mean)
    return torch.where(raters.any(1, keepdim=True), raters, candidates)


# ---------------------------------------------------------------- LLM attention (RoPE, query rows)
def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as Llama applies it: ``x [B, H, n, dh]``, ``cos/sin [B, n, dh]``.

    Bit for bit ``x * cos + rotate_half(x) * sin`` (rotate_half(x) = ``cat(-x2, x1)``),
    without materialising ``rotate_half(x)`` by ``cat``: the rotated product is written
    half by half into one buffer (about half the time on the CPU).
    """
    import torch

    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    half = x.shape[-1] // 2
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        # out= does not support autograd: the plain formula
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    out = x * cos
    rot = torch.empty_like(out)
    torch.mul(x[..., half:], sin[..., :half], out=rot[..., :half])
    rot[..., :half].neg_()
    torch.mul(x[..., :half], sin[..., half:], out=rot[..., half:])
    return out.add_(rot)


def llm_keys(ctx: ScoreContext) -> tuple[Tensor, Tensor, Tensor]:
    """An LLM layer's keys ``[B, Hkv, n, dh]`` as the cache holds them (RoPE applied), and
    the ``[B, n, dh]`` (cos, sin) that rotated them: ones and zeros under `no_rope`
    (the criterion without positions, FEATHER)."""
    import torch

    from ..attention import split_heads

    # float32 before RoPE: a half-precision model's scores are computed in float32 too
    k = split_heads(ctx.captured["k"].float(), ctx.kv_heads)
    cos, sin = ctx.position_embeddings
    b = k.shape[0]
    cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    if not ctx.obs.rope:
        cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
    return apply_rope(k, cos, sin), cos, sin


def _query_rows(ctx: ScoreContext, q: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Any, Any, Any]:
    """The query rows an LLM score reads (RoPE applied), the mask for them, their
    positions (when there is no mask to say what they see) and the rows that count."""
    import torch

    from ..merge import gather_tokens

    queries, mask = ctx.obs.queries, ctx.mask
    b, n = q.shape[0], ctx.captured["k"].shape[1]
    if queries == "last_text":
        rows = apply_rope(q[:, :, -1:], cos[:, -1:], sin[:, -1:])
        return rows, (mask[:, :, -1:, :] if mask is not None else None), None, None
    if queries == "last4_text":  # FrameFusion's rows: the prompt's last 4, causal among themselves
        rows = apply_rope(q[:, :, -4:], cos[:, -4:], sin[:, -4:])
        if mask is not None:
            return rows, mask[:, :, -4:, :], None, None
        return rows, None, torch.arange(n - 4, n, device=q.device), None
    if queries == "all":
        return apply_rope(q, cos, sin), mask, (torch.arange(n, device=q.device) if mask is None else None), None
    if queries not in ("all_text", "raters", "visual"):
        raise ValueError(f"an LLM attention score cannot read the '{queries}' query rows")
    # the text rows, or the image rows (VisionDrop's image-to-image attention)
    pick = ctx.is_img if queries == "visual" else ~ctx.is_img
    rows = pick.nonzero()[:, 1].view(b, -1)
    query_mask = ctx.raters.gather(1, rows) if queries == "raters" else None  # every text row computed
    q_rows = apply_rope(q.gather(2, rows[:, None, :, None].expand(b, q.shape[1], rows.shape[1], q.shape[3])),
                        gather_tokens(cos, rows), gather_tokens(sin, rows))
    if mask is None:
        return q_rows, None, rows, query_mask
    mask = mask.expand(b, *mask.shape[1:])
    return q_rows, mask.gather(2, rows[:, None, :, None].expand(b, mask.shape[1], rows.shape[1], n)), None, query_mask


def llm_attention(ctx: ScoreContext) -> Tensor:
    """An LLM attention score over every row the layer ran on: the query rows of
    `obs.queries` against all keys, RoPE applied as the layer did, GQA keys repeated."""
    import torch

    from ..attention import split_heads

    obs = ctx.obs
    k, cos, sin = llm_keys(ctx)
    q = split_heads(ctx.captured["q"].float(), ctx.heads)
    q_rows, mask, qpos, query_mask = _query_rows(ctx, q, cos, sin)
    if obs.image_keys:  # FEATHER: the softmax over the image tokens' keys only
        mask = restrict_mask(mask, ctx.is_img[:, None, None, :])
    return query_attention(q_rows, k, None, mask=mask, query_positions=qpos, scale=ctx.scaling,
                           head_reduce=obs.heads, head_columns=None if isinstance(obs.heads, str) else ctx.is_img,
                           query_mask=query_mask)


# ---------------------------------------------------------------- kernels and cost
def _cls(ctx: ScoreContext) -> Tensor:
    cap = ctx.captured
    if ctx.obs.heads == "whole":  # one head of the full width: scale 1/sqrt(H·dh), same q·k FLOPs
        return cls_attention(cap["q"], cap["k"], 1)
    return cls_attention(cap["q"], cap["k"], ctx.heads, head_reduce=ctx.obs.heads)


def _attn(ctx: ScoreContext) -> Tensor:
    if ctx.obs.tower != "vit":
        return llm_attention(ctx)
    cap = ctx.captured
    key_index = slice(ctx.lead, None) if ctx.lead else None
    return attention_received(cap["q"], cap["k"], ctx.heads, key_index=key_index, head_reduce=ctx.obs.heads)


def attention_cost(obs: Any, size: ScoreSize) -> int:
    """``2·m·n·H·dh``: the m query rows the score reads against the n keys."""
    q = obs.queries
    if obs.tower == "vit" and q not in ("cls", "all"):
        raise ValueError(f"observation {obs.scorer} at vit.layer{obs.layer} reads text queries ({q})")
    if q in ("cls", "last_text"):
        m = 1
    elif q == "last4_text":
        m = 4
    elif q in ("all_text", "raters"):  # raters: every text row is computed, the raters averaged
        m = size.text
    elif q == "visual":
        m = size.visual
    else:
        m = size.n
    return 2 * m * size.n * size.width


_HIPRUNE = dict(towers=("vit", "llm"), canonical="attn", queries={(): "all"}, keys_match=True,
                cost=attention_cost, kernel=_attn)

register(
    ScorerInfo(
        "cls", ("vit",), canonical="cls", queries={(): "cls"}, needs_cls=True, keys_match=True, rank=10,
        summary="attention paid by the CLS token (ViT only)", cost=attention_cost, kernel=_cls,
    ),
    ScorerInfo(
        "attn", ("vit", "llm"), args=("visual",), max_args=1, canonical="attn",
        queries={(): "all", ("visual",): "visual"}, keys_match=True, rank=20,
        summary="mean attention received, over heads and queries; attn(visual): from the visual "
                "tokens' queries only (LLM)", cost=attention_cost, kernel=_attn,
    ),
    ScorerInfo(
        "text", ("llm",), args=("last", "last4", "all", "raters"), max_args=1, default_args=("last",),
        canonical="text", queries={("last",): "last_text", ("last4",): "last4_text", ("all",): "all_text",
                                   ("raters",): "raters"}, rank=30,
        summary="attention from the last text token; text(last4): mean over the prompt's last 4 rows "
                "(FrameFusion); text(all): mean over all text tokens; text(raters): over SparseVLM's raters "
                "(LLM only)",
        tower_error="'{name}' reads attention from text tokens, which exist only inside the LLM (not at {where})",
        cost=attention_cost, kernel=llm_attention,
    ),
    ScorerInfo("anchors", summary="HiPrune anchor tokens: scored like attn", rank=80, **_HIPRUNE),
    ScorerInfo("registers", summary="HiPrune register tokens: scored like attn", rank=90, **_HIPRUNE),
)
