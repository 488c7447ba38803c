"""Token reduction that produces new tokens: gathering, merging, pooling, dropping.

Counted FLOPs (`docs/dev/contracts.md`, ``d`` = width of the similarity metric):
`merge_rest` ``2·(R−t)·t·d``; `bipartite_merge` ``2·|A|·|B|·d``; the rest none. Group
sums are formed with ``scatter_add`` (uncounted), never with a one-hot matmul.

Provenance: `merge_rest` and `bipartite_merge` report ``assign`` ``[B, n]``, the output
slot each input token went into, so a visualisation can colour the original grid.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .similarity import normalize

__all__ = ["gather_tokens", "merge_rest", "contextual_targets", "bipartite_merge", "pool2d", "pooled_grid", "drop_all",
           "recycle_clusters", "absorb_neighbours", "recycle_cells"]


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Tokens ``idx`` of each sample.

    Parameters
    ----------
    x : Tensor
        ``[B, n, ...]``.
    idx : Tensor
        ``[B, k]`` int64 (or ``[k]`` shared by the batch).

    Returns
    -------
    Tensor
        ``[B, k, ...]``.

    Notes
    -----
    Rows are copied with ``index_select`` (whole rows at a time), not with ``gather``
    over an index expanded to ``[B, k, ...]``, which reads one index per element and is
    5-20x slower on the CPU for hidden-state-sized rows (benchmarks/README.md).
    """
    b = x.shape[0]
    if idx.dim() == 1:
        return x.index_select(1, idx)
    _check_rows(idx, b, x.shape[1])
    if b == 1:
        return x[0].index_select(0, idx[0]).unsqueeze(0)
    n, k, rest = x.shape[1], idx.shape[1], x.shape[2:]
    # one flat index_select over [B*n] rows; an expanded (stride-0) x is materialised first
    flat = x.contiguous().view(b * n, *rest)
    return flat.index_select(0, _flat_rows(idx, n)).view(b, k, *rest)


def _check_rows(idx: Tensor, b: int, n: int) -> None:
    """Row indices ``[B, k]`` must be per sample and in 0..n-1: a flat index over ``[B*n]``
    rows would otherwise read (or write) another sample's row without an error."""
    if idx.shape[0] != b:
        raise ValueError(f"index batch {idx.shape[0]} does not match the tokens' batch {b}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"token index out of range 0..{n - 1}")


def _flat_rows(idx: Tensor, n: int) -> Tensor:
    return (idx + torch.arange(idx.shape[0], device=idx.device).mul_(n).unsqueeze(1)).reshape(-1)


def _scatter_rows(dst: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``dst[b, index[b, i]] += src[b, i]`` over the last dim (in place, returns dst).

    Whole rows are added with ``index_add_`` (same additions in the same order as
    ``scatter_add_`` over an expanded index, 5-15x faster on the CPU)."""
    b, t = dst.shape[:2]
    _check_rows(index, b, t)
    if dst.is_contiguous() and dst.dim() == 3:
        dst.view(b * t, dst.shape[2]).index_add_(0, _flat_rows(index, t), src.reshape(-1, src.shape[-1]))
        return dst
    return dst.scatter_add_(1, index[..., None].expand(-1, -1, src.shape[-1]), src)


def _split_rest(kept_idx: Tensor, n: int, t: int) -> tuple[Tensor, Tensor]:
    """Non-kept tokens split into VisionZip targets ``[B, t]`` and the others ``[B, R-t]``."""
    b, k = kept_idx.shape
    r = n - k
    device = kept_idx.device
    rest_mask = torch.ones(b, n, dtype=torch.bool, device=device)
    rest_mask.scatter_(1, kept_idx, False)
    rest_idx = rest_mask.nonzero()[:, 1].view(b, r)  # ascending
    step = max(1, r // max(t, 1))
    target_rank = torch.arange(0, step * t, step, device=device)
    is_target = torch.zeros(r, dtype=torch.bool, device=device)
    is_target[target_rank] = True
    return rest_idx[:, target_rank], rest_idx[:, ~is_target]


def contextual_targets(kept_idx: Tensor, n: int, t: int) -> Tensor:
    """The tokens `merge_rest` uses as targets (the identity of each contextual token).

    Parameters
    ----------
    kept_idx : Tensor
        ``[B, k]`` kept tokens.
    n : int
        Tokens in the stage.
    t : int
        Contextual tokens (``0 <= t <= n - k``).

    Returns
    -------
    Tensor
        ``[B, t]`` int64, ascending: the non-kept tokens of rank ``i * max(1, R // t)``.
    """
    r = n - kept_idx.shape[1]
    if not 0 <= t <= r:
        raise ValueError(f"cannot form {t} contextual tokens from {r} remaining tokens")
    return _split_rest(kept_idx, n, t)[0]


def merge_rest(
    x: Tensor,
    kept_idx: Tensor,
    t: int,
    *,
    metric: Tensor | None = None,
    mode: Literal["mean", "visionzip"] = "mean",
) -> tuple[Tensor, Tensor]:
    """VisionZip contextual merging: fold the non-kept tokens into t contextual tokens.

    Parameters
    ----------
    x : Tensor
        ``[B, n, d]`` tokens of the stage.
    kept_idx : Tensor
        ``[B, k]`` kept (dominant) tokens, ascending.
    t : int
        Contextual tokens to produce (``0 <= t <= R = n - k``).
    metric : Tensor, optional
        ``[B, n, dm]`` features the similarity is measured on (VisionZip uses the layer's
        keys); default ``x``. The matmul costs ``2·(R−t)·t·dm``.
    mode : {"mean", "visionzip"}
        ``"mean"`` (the contract): a contextual token is the mean of its group, target
        included. ``"visionzip"``: as in VisionZip's released code, target + mean of the
        tokens assigned to it (target alone when none).

    Returns
    -------
    out : Tensor
        ``[B, k + t, d]``: the kept tokens in order, then the t contextual tokens in the
        order of their targets.
    assign : Tensor
        ``[B, n]`` int64: the output slot each input token went into.

    Notes
    -----
    Targets are the non-kept tokens of rank ``i * max(1, R // t)``, ``i < t``, in
    position order (VisionZip's stride). Each other non-kept token joins the target of
    highest cosine similarity (ties: lower target) through one ``bmm``
    ``[R−t, dm] x [dm, t]``; sums are accumulated in float32 with ``scatter_add``.
    """
    b, n, d = x.shape
    k = kept_idx.shape[1]
    r = n - k
    if not 0 <= t <= r:
        raise ValueError(f"cannot form {t} contextual tokens from {r} remaining tokens")
    device = x.device
    kept_idx = kept_idx.to(device)
    assign = torch.empty(b, n, dtype=torch.long, device=device)
    slots = torch.arange(n, device=device)[None].expand(b, -1)
    assign.scatter_(1, kept_idx, slots[:, :k])
    kept = gather_tokens(x, kept_idx)
    if t == 0:
        if r:
            rest = torch.ones(b, n, dtype=torch.bool, device=device)
            rest.scatter_(1, kept_idx, False)
            assign.masked_fill_(rest, -1)  # dropped
        return kept, assign

    tgt_idx, oth_idx = _split_rest(kept_idx, n, t)

    m = normalize(x if metric is None else metric)
    sim = torch.bmm(gather_tokens(m, oth_idx), gather_tokens(m, tgt_idx).transpose(1, 2))
    choice = sim.argmax(dim=2)  # [B, r - t]; first maximum -> lower target on ties

    xf = x.float()
    targets = gather_tokens(xf, tgt_idx)
    others_sum = _scatter_rows(torch.zeros_like(targets), choice, gather_tokens(xf, oth_idx))
    ones = torch.ones(choice.shape, device=device)
    others_cnt = torch.zeros(b, t, device=device).scatter_add_(1, choice, ones)
    if mode == "mean":
        ctx = (targets + others_sum) / (others_cnt + 1.0)[..., None]
    elif mode == "visionzip":
        ctx = targets + others_sum / others_cnt.clamp(min=1.0)[..., None]
    else:
        raise ValueError(f"mode must be 'mean' or 'visionzip', got {mode!r}")

    assign.scatter_(1, tgt_idx, k + slots[:, :t])
    assign.scatter_(1, oth_idx, k + choice)
    return torch.cat([kept, ctx.to(x.dtype)], dim=1), assign


def bipartite_merge(
    x: Tensor,
    r: int,
    *,
    size: Tensor | None = None,
    metric: Tensor | None = None,
    protect_first: bool = False,
    return_assign: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """ToMe bipartite soft matching: merge r tokens of set A into set B.

    Parameters
    ----------
    x : Tensor
        ``[B, n, d]``.
    r : int
        Tokens to remove (``0 <= r <= |A|``, minus one when ``protect_first``).
    size : Tensor, optional
        ``[B, n, 1]`` (or ``[B, n]``) how many original tokens each token stands for;
        default ones.
    metric : Tensor, optional
        ``[B, n, dm]`` features to match on (ToMe: head-mean keys); default ``x``.
    protect_first : bool
        Never merge token 0 (a CLS token).
    return_assign : bool
        Also return ``assign`` ``[B, n]``: output slot of every input token.

    Returns
    -------
    x_out : Tensor
        ``[B, n - r, d]``, tokens in their original position order.
    size_out : Tensor
        ``[B, n - r, 1]`` float32 sizes.
    assign : Tensor
        Only with ``return_assign``.

    Notes
    -----
    A = even positions, B = odd positions; one cosine matrix ``[|A|, d] x [d, |B|]``.
    Each A token proposes its most similar B token (ties: lower B index); the r
    proposals with the highest similarity (ties: lower A index) are merged, each into its
    B token by size-weighted average ``Σ size·x / Σ size`` (float32, ``scatter_add``).
    Unlike ToMe's code, which returns ``[unmerged A..., B...]``, the survivors keep their
    original order.
    """
    b, n, d = x.shape
    device = x.device
    if size is None:
        size = torch.ones(b, n, 1, device=device)
    size = size.float().reshape(b, n, 1)
    n_a = (n + 1) // 2
    limit = n_a - (1 if protect_first else 0)
    if not 0 <= r <= max(limit, 0) or r > n // 2:
        raise ValueError(f"cannot merge {r} tokens out of {n} (at most {min(limit, n // 2)})")
    pos = torch.arange(n, device=device)
    if r == 0:
        out = (x, size)
        return (*out, pos[None].expand(b, -1).clone()) if return_assign else out

    src, dst = _bipartite_pairs(x if metric is None else metric, r, protect_first)
    full, full_size = _merge_into_b(x, size, src, dst)
    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    keep.scatter_(1, 2 * src, False)
    keep_idx = keep.nonzero()[:, 1].view(b, n - r)
    x_out = gather_tokens(full, keep_idx).to(x.dtype)
    size_out = gather_tokens(full_size, keep_idx)
    if not return_assign:
        return x_out, size_out
    assign = torch.full((b, n), -1, dtype=torch.long, device=device)
    assign.scatter_(1, keep_idx, pos[None, : n - r].expand(b, -1))
    assign.scatter_(1, 2 * src, assign.gather(1, 2 * dst + 1))
    return x_out, size_out, assign


def _bipartite_pairs(metric: Tensor, r: int, protect_first: bool) -> tuple[Tensor, Tensor]:
    """The r merges of `bipartite_merge`: A-local sources ``[B, r]`` and the B-local
    targets they proposed ``[B, r]`` (the one counted matmul)."""
    m = normalize(metric)
    scores = torch.matmul(m[:, 0::2], m[:, 1::2].transpose(1, 2))  # [B, |A|, |B|]
    if protect_first:
        scores[:, 0, :] = float("-inf")
    best = scores.argmax(dim=2)  # [B, |A|]
    best_sim = scores.gather(2, best[..., None]).squeeze(2)
    edge = torch.sort(best_sim, dim=1, descending=True, stable=True).indices
    src = edge[:, :r]  # merged A tokens (A-local)
    return src, best.gather(1, src)  # their B tokens (B-local)


def _merge_into_b(x: Tensor, size: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """All n tokens (float32) and sizes with each B token replaced by the size-weighted
    mean of itself and the A tokens merged into it; A tokens unchanged."""
    xs = x.float() * size
    b_sum = _scatter_rows(xs[:, 1::2].clone(), dst, gather_tokens(xs[:, 0::2], src))
    b_size = _scatter_rows(size[:, 1::2].clone(), dst, gather_tokens(size[:, 0::2], src))
    full = x.float().clone()
    full[:, 1::2] = b_sum / b_size
    full_size = size.clone()
    full_size[:, 1::2] = b_size
    return full, full_size


def pooled_grid(grid: tuple[int, int], kr: int, kc: int) -> tuple[int, int]:
    """Grid after `pool2d`: ``(ceil(rows / kr), ceil(cols / kc))``."""
    rows, cols = grid
    return -(-rows // kr), -(-cols // kc)


def pool2d(x: Tensor, grid: tuple[int, int], kr: int, kc: int) -> Tensor:
    """Average-pool a full token grid with a ``kr x kc`` window (stride = window, ceil mode).

    Parameters
    ----------
    x : Tensor
        ``[B, rows*cols, d]`` tokens in raster order.
    grid : (int, int)
        ``(rows, cols)``.
    kr, kc : int
        Window (and stride) in rows and columns.

    Returns
    -------
    Tensor
        ``[B, ceil(rows/kr) * ceil(cols/kc), d]`` in raster order. A window cut by the
        grid edge averages only the tokens it covers. No counted FLOPs.
    """
    b, n, d = x.shape
    rows, cols = grid
    if n != rows * cols:
        raise ValueError(f"pool2d needs the full {rows}x{cols} grid, got {n} tokens")
    if kr < 1 or kc < 1:
        raise ValueError(f"pool window must be positive, got {kr}x{kc}")
    kr, kc = min(kr, rows), min(kc, cols)
    img = x.float().view(b, rows, cols, d).permute(0, 3, 1, 2)
    y = F.avg_pool2d(img, (kr, kc), stride=(kr, kc), ceil_mode=True)
    return y.flatten(2).transpose(1, 2).to(x.dtype)


def drop_all(x: Tensor) -> Tensor:
    """No tokens: ``[B, 0, d]``."""
    return x[:, :0]


def recycle_cells(x: Tensor, kept_idx: Tensor, scores: Tensor, cell_ids: Tensor, cells: int) -> tuple[Tensor, Tensor]:
    """VFlowOpt's recycling: in every cell, the tokens not kept, weighted by their score
    (``s_j / Σ s`` over the cell's dropped tokens), become one token appended to the
    kept ones.

    Parameters
    ----------
    x : Tensor
        ``[B, n, d]`` tokens.
    kept_idx : Tensor
        ``[B, k]`` kept indices.
    scores : Tensor
        ``[B, n]`` the weights (negative or NaN count as 0; a cell whose dropped tokens
        all weigh 0 takes their plain mean).
    cell_ids : Tensor
        ``[B, n]`` cell of each token, ``0..cells-1`` (-1: in no cell, never recycled).
    cells : int
        Number of cells; every cell must hold a dropped token.

    Returns
    -------
    (Tensor, Tensor)
        ``[B, k + cells, d]`` kept tokens then one token per cell (cell order), and
        ``[B, cells]`` the index of each cell's best-scored dropped token (its identity).

    Notes
    -----
    Weighted sums by scatter: no matmul, no counted FLOPs.
    """
    b, n, d = x.shape
    dropped = torch.ones(b, n, dtype=torch.bool, device=x.device)
    dropped.scatter_(1, kept_idx, False)
    dropped &= cell_ids >= 0
    ids = cell_ids.clamp(min=0)
    w = torch.nan_to_num(scores.float(), nan=0.0).clamp(min=0) * dropped
    mass = torch.zeros(b, cells, device=x.device).scatter_add_(1, ids, w)
    members = torch.zeros(b, cells, device=x.device).scatter_add_(1, ids, dropped.float())
    if bool((members == 0).any()):
        raise ValueError("a cell has no dropped token to recycle")
    flat = mass.gather(1, ids) <= 0  # the token's cell has no weight: plain mean there
    weight = torch.where(flat, dropped.float(), w)
    total = torch.where(mass > 0, mass, members)
    summed = torch.zeros(b, cells, d, device=x.device).scatter_add_(
        1, ids[..., None].expand(-1, -1, d), x.float() * weight[..., None])
    merged = (summed / total[..., None]).to(x.dtype)
    in_cell = dropped[:, None, :] & (ids[:, None, :] == torch.arange(cells, device=x.device)[None, :, None])
    key = torch.where(in_cell, torch.nan_to_num(scores.float(), nan=float("-inf"))[:, None, :], float("-inf"))
    best = torch.where(in_cell.any(-1), key.argmax(-1), 0)
    # a cell whose dropped tokens all score -inf/NaN: its first dropped token
    best = torch.where(torch.isinf(key.amax(-1)), in_cell.float().argmax(-1), best)
    return torch.cat([gather_tokens(x, kept_idx), merged], dim=1), best


def recycle_clusters(x: Tensor, kept_idx: Tensor, scores: Tensor, m: int, c: int) -> tuple[Tensor, Tensor]:
    """SparseVLM v1's recycling: the m best-scored dropped tokens, clustered by DPC-kNN
    into c tokens appended to the kept ones.

    Parameters
    ----------
    x : Tensor
        ``[B, n, d]`` tokens of the stage.
    kept_idx : Tensor
        ``[B, k]`` kept tokens, ascending.
    scores : Tensor
        ``[B, n]``: the dropped tokens with the m highest scores are recycled (ties: lower
        index); the others are discarded.
    m, c : int
        Recycled tokens (``1 <= m <= n - k``) and clusters (``1 <= c <= m``).

    Returns
    -------
    out : Tensor
        ``[B, k + c, d]``: the kept tokens in order, then one token per cluster (the mean
        of its members), clusters in decreasing order of their centre's DPC score.
    centres : Tensor
        ``[B, c]`` int64: the input index of each cluster's centre (its identity).

    Notes
    -----
    Density peaks with k nearest neighbours (k = c, as SparseVLM sets it), on Euclidean
    distances divided by ``sqrt(d)``: density ``exp(-mean of the squared distances to the
    c nearest, self included)``; a token's delta is its distance to the nearest denser
    token (the largest distance of all for the densest); the c tokens with the highest
    ``delta * density`` are the centres, every recycled token joins its nearest centre
    (a centre joins itself). Equal densities are ordered by index (SparseVLM adds random
    noise instead). Distances come from one ``bmm`` ``[m, d] x [d, m]``.
    """
    b, n, d = x.shape
    k = kept_idx.shape[1]
    if not 1 <= m <= n - k:
        raise ValueError(f"cannot recycle {m} of the {n - k} dropped tokens")
    if not 1 <= c <= m:
        raise ValueError(f"cannot form {c} clusters from {m} recycled tokens")
    device = x.device
    kept_idx = kept_idx.to(device)
    dropped = torch.ones(b, n, dtype=torch.bool, device=device)
    dropped.scatter_(1, kept_idx, False)
    rest = dropped.nonzero()[:, 1].view(b, n - k)  # only dropped tokens compete, whatever their scores
    rest_scores = scores.to(device).float().gather(1, rest).nan_to_num(nan=float("-inf"))
    order = torch.sort(rest_scores, dim=1, descending=True, stable=True).indices
    recycled = rest.gather(1, order[:, :m])  # [B, m]
    feats = gather_tokens(x, recycled).float()
    sq = feats.pow(2).sum(-1)
    dist = (sq[:, :, None] + sq[:, None, :] - 2 * torch.bmm(feats, feats.transpose(1, 2))).clamp_min_(0)
    dist = dist.sqrt_().div_(d**0.5)
    dist.diagonal(dim1=1, dim2=2).zero_()
    nearest = torch.topk(dist, c, dim=-1, largest=False).values
    density = torch.exp(-nearest.pow(2).mean(-1))  # [B, m]
    # rank by density, ties by index: j is denser than i when its rank is smaller
    rank = torch.empty_like(recycled)
    by_density = torch.sort(density, dim=1, descending=True, stable=True).indices
    rank.scatter_(1, by_density, torch.arange(m, device=device).expand(b, -1).contiguous())
    denser = rank[:, None, :] < rank[:, :, None]  # [B, i, j]
    far = dist.flatten(1).amax(-1)[:, None, None].expand_as(dist)
    delta = torch.where(denser, dist, far).amin(-1)
    centre_pos = torch.topk(delta * density, c, dim=-1).indices  # [B, c], best first
    member_of = dist.gather(1, centre_pos[:, :, None].expand(-1, -1, m)).argmin(1)  # [B, m] nearest centre
    member_of.scatter_(1, centre_pos, torch.arange(c, device=device).expand(b, -1).contiguous())
    sums = torch.zeros(b, c, d, dtype=torch.float32, device=device)
    sums.scatter_add_(1, member_of[..., None].expand(-1, -1, d), feats)
    counts = torch.zeros(b, c, dtype=torch.float32, device=device)
    counts.scatter_add_(1, member_of, torch.ones_like(member_of, dtype=torch.float32))
    clusters = (sums / counts[..., None]).to(x.dtype)
    return torch.cat([gather_tokens(x, kept_idx), clusters], dim=1), recycled.gather(1, centre_pos)


def absorb_neighbours(x: Tensor, kept_idx: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """PruMerge's merge: every kept token adds the score-weighted sum of its k most similar
    other tokens (kept or not); the dropped tokens, score-weighted, are summed into one
    token appended after the kept ones.

    Parameters
    ----------
    x : Tensor
        ``[B, n, d]`` tokens of the stage (also the similarity metric: cosine).
    kept_idx : Tensor
        ``[B, q]`` kept tokens, ascending (at least one token dropped).
    scores : Tensor
        ``[B, n]`` weights (the stage's first score, e.g. CLS attention; unnormalised, as
        PruMerge uses them).
    k : int
        Neighbours per kept token, ``1 <= k <= n - 1``; ties: lower index.

    Returns
    -------
    out : Tensor
        ``[B, q + 1, d]``: ``x_i + Σ_{j in N_k(i)} s_j x_j`` for the kept tokens in order,
        then ``Σ_{dropped j} s_j x_j``.
    extra : Tensor
        ``[B, 1]``: the dropped token with the highest score (the extra token's identity).

    Notes
    -----
    One ``bmm`` ``[q, d] x [d, n]`` of normalised tokens (``2·q·n·d`` FLOPs); the weighted
    sums are gathers, not matmuls.
    """
    b, n, d = x.shape
    q = kept_idx.shape[1]
    if not 1 <= k <= n - 1:
        raise ValueError(f"cannot take {k} neighbours among {n - 1} other tokens")
    if q >= n:
        raise ValueError("absorb needs at least one dropped token")
    device = x.device
    kept_idx = kept_idx.to(device)
    xf = x.float()
    w = scores.to(device).float().nan_to_num(0.0)
    unit = torch.nn.functional.normalize(xf, dim=-1)
    sim = torch.bmm(gather_tokens(unit, kept_idx), unit.transpose(1, 2))  # [B, q, n]
    sim.scatter_(2, kept_idx[..., None], float("-inf"))  # not itself
    # top-k with ties to the lower index: sort is stable on the descending order
    nbr = torch.sort(sim, dim=-1, descending=True, stable=True).indices[..., :k]  # [B, q, k]
    nbr_x = gather_tokens(xf, nbr.reshape(b, q * k)).view(b, q, k, d)
    nbr_w = w.gather(1, nbr.reshape(b, q * k)).view(b, q, k, 1)
    kept_out = gather_tokens(xf, kept_idx) + (nbr_x * nbr_w).sum(2)
    dropped = torch.ones(b, n, dtype=torch.bool, device=device)
    dropped.scatter_(1, kept_idx, False)
    extra = (xf * (w * dropped)[..., None]).sum(1, keepdim=True)
    best = torch.where(dropped, w, torch.full_like(w, float("-inf"))).argmax(1, keepdim=True)
    return torch.cat([kept_out, extra], dim=1).to(x.dtype), best
