"""Token selectors: which of a stage's n tokens each sample keeps.

Conventions shared by every selector
------------------------------------
- Batch-aware: inputs are ``[B, n, ...]``; every sample selects its own tokens, and every
  sample selects the same number ``k``.
- Returned indices are ``[B, k]`` int64, **sorted ascending** (original order kept); a
  selector's docstring names its result only where it differs.
- Deterministic: equal scores are broken by position, the lower token index wins.
  Scores are compared in float32; NaN ranks below everything.
- ``exclude`` (``[B, n]`` bool, True = may not be chosen) is honoured exactly; asking for
  more tokens than a sample has available raises `ValueError`.
- No counted FLOPs, except `diverse` / `unique`: one pairwise cosine matrix (``2·n²·d``).

Spatial helpers (`buffers`, `split_regions`) take ``positions`` ``[B, n]`` (or ``[n]``):
the original raster index ``row*cols + col`` of each token on a ``grid = (rows, cols)``;
a negative position marks a token that is not on the grid (CLS, newline tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .similarity import normalize, pairwise_cosine

__all__ = [
    "topk",
    "diverse",
    "diverse_sum",
    "unique",
    "uniform",
    "random",
    "random_keys",
    "buffers",
    "neighbour_mask",
    "split_chunks",
    "split_regions",
    "per_region",
    "SelectFn",
]

_NEG = float("-inf")


# --------------------------------------------------------------------------- helpers
def _empty(b: int, device: torch.device) -> Tensor:
    return torch.zeros(b, 0, dtype=torch.long, device=device)


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if k > n:
        raise ValueError(f"cannot select {k} tokens out of {n}")


def _check_available(allowed: Tensor, k: int, what: str) -> None:
    """Raise unless every sample has at least k allowed tokens (one host sync)."""
    if k == 0 or allowed.shape[0] == 0:
        return
    have = int(allowed.sum(dim=1).min())
    if have < k:
        raise ValueError(f"{what}: asked for {k} tokens but a sample has only {have} available")


def _as_scores(scores: Tensor) -> Tensor:
    s = scores.float()
    return torch.nan_to_num(s, nan=_NEG)


def _lexsort(scores: Tensor, group: Tensor | None = None) -> Tensor:
    """Per-row order by (group ascending, score descending, index ascending).

    Two stable sorts make the order total and deterministic: the first sorts by score
    (stable, so equal scores keep index order), the second by group (stable, so the
    score order survives inside each group).
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    if group is not None:
        g = group.to(torch.int8).gather(1, order)
        order = order.gather(1, torch.sort(g, dim=1, stable=True).indices)
    return order


def _finish(order: Tensor, k: int) -> Tensor:
    return order[:, :k].sort(dim=1).values


def _batch_positions(positions: Tensor, b: int) -> Tensor:
    positions = positions.long()
    return positions[None].expand(b, -1) if positions.dim() == 1 else positions


# --------------------------------------------------------------------------- top-k
def topk(scores: Tensor, k: int, *, exclude: Tensor | None = None) -> Tensor:
    """The k highest-scoring tokens of each sample.

    Parameters
    ----------
    scores : Tensor
        ``[B, n]`` (any float dtype; compared in float32, NaN lowest).
    k : int
        Tokens to select.
    exclude : Tensor, optional
        ``[B, n]`` bool; True tokens are never selected.

    Returns
    -------
    Tensor
        ``[B, k]`` int64 indices, ascending. Ties: the lower index wins (unlike
        ``torch.topk``, whose tie order is unspecified).
    """
    b, n = scores.shape
    _check_k(k, n)
    if k == 0:
        return _empty(b, scores.device)
    if exclude is not None:
        _check_available(~exclude, k, "top")
    return _finish(_lexsort(_as_scores(scores), exclude), k)


# --------------------------------------------------------------------------- similarity
@dataclass(frozen=True)
class _GreedyRule:
    """How a greedy similarity selector values the tokens, on the matrix ``m`` it reads
    (``m[b, i, j]`` relates kept token i to candidate j).

    `state` ``[B, n]`` is what the kept set (seeds, then picks) gives each token; the next
    pick is the available token of highest `score(state)`, lowest index on ties. A sample
    without seeds makes its first pick by `first(m, available)` instead.
    """

    matrix: Callable[[Tensor], Tensor]  # cosine matrix -> m
    seeded: Callable[[Tensor, Tensor], Tensor]  # (m, seed_mask) -> initial state
    unseeded: float  # the initial state's value without seeds
    score: Callable[[Tensor], Tensor]
    first: Callable[[Tensor, Tensor], Tensor]
    grow: Callable[[Tensor, Tensor], Tensor]  # (state, row of m of the pick) -> state


def _greedy_select(sim: Tensor, k: int, seed_mask: Tensor | None, exclude: Tensor | None, rule: _GreedyRule,
                   what: str) -> Tensor:
    """Greedy selection of k tokens by `rule` (see `_GreedyRule`), ``[B, k]`` ascending."""
    b, n, _ = sim.shape
    device = sim.device
    _check_k(k, n)
    if k == 0:
        return _empty(b, device)
    m = rule.matrix(sim)
    avail = torch.ones(b, n, dtype=torch.bool, device=device)
    if exclude is not None:
        avail &= ~exclude
    if seed_mask is not None:
        avail &= ~seed_mask
        has_seed = seed_mask.any(dim=1)
        state = rule.seeded(m, seed_mask)
    else:
        has_seed = torch.zeros(b, dtype=torch.bool, device=device)
        state = torch.full((b, n), rule.unseeded, dtype=m.dtype, device=device)
    _check_available(avail, k, what)
    first = rule.first(m, avail)
    picked = torch.empty(b, k, dtype=torch.long, device=device)
    for step in range(k):
        score = rule.score(state) if step else torch.where(has_seed[:, None], rule.score(state), first)
        j = score.masked_fill(~avail, _NEG).argmax(dim=1)  # first maximum: lowest index on ties
        picked[:, step] = j
        avail.scatter_(1, j[:, None], False)
        state = rule.grow(state, m.gather(1, j[:, None, None].expand(b, 1, n)).squeeze(1))
    return picked.sort(dim=1).values


def _similarity(x: Tensor | None, sim: Tensor | None, what: str) -> Tensor:
    """The precomputed cosine matrix, or `pairwise_cosine` of the features."""
    if sim is not None:
        return sim
    if x is None:
        raise ValueError(f"{what} needs features x or a precomputed sim")
    return pairwise_cosine(x)


def _other_candidates(sim: Tensor, cand: Tensor) -> Tensor:
    """``[B, n, n]`` bool: entry (i, j) does not count for column j (i is not a candidate,
    or i is j)."""
    eye = torch.eye(sim.shape[1], dtype=torch.bool, device=sim.device)
    return ~cand[:, :, None] | eye


def _first_most_isolated(sim: Tensor, cand: Tensor) -> Tensor:
    """DivPrune's first pick: the candidate whose nearest other candidate is farthest."""
    nearest = sim.masked_fill(_other_candidates(sim, cand), _NEG).amax(dim=1)  # max similarity to another candidate
    return -nearest  # +inf for a lone candidate


def _first_most_central(sim: Tensor, cand: Tensor) -> Tensor:
    """`unique`'s first pick: the candidate with the highest mean similarity to the others."""
    others = _other_candidates(sim, cand)
    total = sim.masked_fill(others, 0.0).sum(dim=1)
    count = (~others).sum(dim=1).clamp(min=1)
    return total / count


def _max_similarity(sim: Tensor, seed_mask: Tensor) -> Tensor:
    return sim.masked_fill(~seed_mask[:, :, None], _NEG).amax(dim=1)


def _summed_distance(dist: Tensor, mask: Tensor) -> Tensor:
    return (dist * mask[:, :, None].to(dist.dtype)).sum(dim=1)


def _max_min_rule(first: Callable[[Tensor, Tensor], Tensor]) -> _GreedyRule:
    """Least similar to its nearest kept token first (state: the highest cosine similarity
    to the kept set)."""
    return _GreedyRule(matrix=lambda sim: sim, seeded=_max_similarity, unseeded=_NEG, score=torch.neg, first=first,
                       grow=torch.maximum)


_DIVERSE = _max_min_rule(_first_most_isolated)
_UNIQUE = _max_min_rule(_first_most_central)
# state: the summed cosine distance to the kept set; without seeds the first pick has the
# largest summed distance to the other candidates
_DIVERSE_SUM = _GreedyRule(matrix=lambda sim: 1 - sim, seeded=_summed_distance, unseeded=0.0, score=lambda t: t,
                           first=_summed_distance, grow=torch.add)

def diverse(x: Tensor | None, k: int, *, seed_mask: Tensor | None = None, exclude: Tensor | None = None,
            sim: Tensor | None = None) -> Tensor:
    """Greedy max-min diversity on cosine distance (DivPrune; k-center).

    Parameters
    ----------
    x : Tensor or None
        ``[B, n, d]`` token features (None when ``sim`` is given).
    k : int
        Tokens to select.
    seed_mask : Tensor, optional
        ``[B, n]`` bool: tokens already kept (e.g. by earlier terms). They start the set
        the distances are measured to, and are not selected again.
    exclude : Tensor, optional
        ``[B, n]`` bool: tokens that may not be selected.
    sim : Tensor, optional
        Precomputed `pairwise_cosine` ``[B, n, n]`` (shared by several terms of a stage).

    Notes
    -----
    Each step adds the available token whose cosine distance ``1 - cos`` to its nearest
    kept token is largest. Without seeds the first token is, as in DivPrune's released
    code, the one whose nearest *other* candidate is farthest (the most isolated token;
    DivPrune takes the second-smallest column entry of the distance matrix, i.e. the
    smallest off-diagonal one). Unlike that code, kept tokens are masked out explicitly
    instead of relying on their zero self-distance. One ``2·n²·d`` matmul, then ``k``
    vectorised steps over the matrix.
    """
    return _greedy_select(_similarity(x, sim, "diverse"), k, seed_mask, exclude, _DIVERSE, "diverse")


def diverse_sum(x: Tensor | None, k: int, *, seed_mask: Tensor | None = None, exclude: Tensor | None = None,
                sim: Tensor | None = None) -> Tensor:
    """Greedy max-sum diversification on cosine distance (ToDRE). Arguments and result as
    in `diverse`.

    Each step adds the available token whose *summed* cosine distance ``sum (1 - cos)``
    to the kept set (seeds, e.g. a pivot kept by an earlier term, and earlier picks) is
    largest, lowest index on ties. Unlike max-min (`diverse`), a token close to one kept
    token can still be picked when it is far from the rest. Without seeds the first pick
    is the candidate with the largest summed distance to all other candidates. One
    ``2·n²·d`` matmul, then ``k`` vectorised steps.
    """
    return _greedy_select(_similarity(x, sim, "diverse_sum"), k, seed_mask, exclude, _DIVERSE_SUM, "diverse(sum)")


def unique(x: Tensor | None, k: int, *, seed_mask: Tensor | None = None, exclude: Tensor | None = None,
           sim: Tensor | None = None) -> Tensor:
    """Duplication-aware greedy selection: keep the token least similar to what is kept.
    Arguments and result as in `diverse`.

    Each step adds the available token whose *maximum* cosine similarity to the kept set
    (seeds and earlier picks) is smallest: the least duplicated token (the redundancy
    criterion of DART, where the seeds play the role of DART's pivots). Given seeds this
    is the same greedy rule as `diverse` (``argmin max cos = argmax min (1 - cos)``); the
    two differ only in how a sample without seeds starts: `unique` starts from the most
    *central* token (highest mean similarity to the other candidates, a representative
    pivot), `diverse` from the most isolated one. One ``2·n²·d`` matmul.
    """
    return _greedy_select(_similarity(x, sim, "unique"), k, seed_mask, exclude, _UNIQUE, "unique")


def far(
    x: Tensor, pivot_mask: Tensor, per_pivot: int, *,
    extra_pivots: Tensor | None = None, extra_keys: Tensor | None = None, pivot_scores: Tensor | None = None,
    exclude: Tensor | None = None, keys: Tensor | None = None,
) -> Tensor:
    """Pivot-based duplicate removal (DART): each pivot in turn keeps the `per_pivot`
    available tokens least cosine-similar to it.

    Parameters
    ----------
    x : Tensor
        ``[B, n, d]`` token features.
    pivot_mask : Tensor
        ``[B, n]`` bool: the tokens that are pivots (already kept; never chosen again).
        The same count in every row.
    per_pivot : int
        Tokens each pivot keeps.
    extra_pivots : Tensor, optional
        ``[B, m, d]`` features of further pivots that are not candidates (DART's text
        pivots); they come after the token pivots.
    exclude : Tensor, optional
        ``[B, n]`` bool: tokens no pivot may keep.
    keys : Tensor, optional
        ``[B, n]`` int64 prompt positions of the tokens. Given (with `extra_keys` when
        there are extra pivots), the pivots take turns in DART's order (Notes).
    extra_keys : Tensor, optional
        ``[B, m]`` int64 prompt positions of `extra_pivots`.
    pivot_scores : Tensor, optional
        ``[B, n]``: with `keys`, the token pivots enter DART's set by descending score
        (its ``topk`` order; ties: the lower index); without, by position.

    Returns
    -------
    Tensor
        ``[B, per_pivot · P]`` int64 indices, ascending (P = pivots per row).

    Notes
    -----
    Pivots take turns in order: the token pivots by position, then `extra_pivots` in
    their given order; a token kept by one pivot is unavailable to the next. Ties: the
    lower index. With `keys`, the order is instead the one DART walks: the iteration
    order of a Python ``set`` built from the pivots' positions, token pivots first (by
    `pivot_scores`), then the extra pivots in their given order (see `dart_order`).
    One matmul of the P pivots against the n tokens: ``2·P·n·d``.
    """
    b, n, _ = x.shape
    p_rows = pivot_mask.sum(1)
    if bool((p_rows != p_rows[0]).any()):
        raise ValueError("every row needs the same number of pivots")
    rows, turns = _pivot_turns(pivot_mask.nonzero()[:, 1].view(b, -1), keys, extra_keys, pivot_scores)
    pivots = [x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))]
    if extra_pivots is not None:
        pivots.append(extra_pivots.to(x.dtype))
    piv = torch.cat(pivots, dim=1)
    sim = torch.bmm(normalize(piv), normalize(x).transpose(1, 2))  # [B, P, n]
    available = ~pivot_mask if exclude is None else ~pivot_mask & ~exclude
    chosen = []
    for t in range(piv.shape[1]):
        i = t if turns is None else turns[:, t]
        # least similar first; among equals, the lower index (stable sort on similarity)
        s = _pivot_row(sim, i).masked_fill(~available, float("inf"))
        idx = torch.sort(s, dim=1, stable=True).indices[:, :per_pivot]
        if bool((~available.gather(1, idx)).any()):
            raise ValueError(f"pivot {t} has fewer than {per_pivot} tokens left to keep")
        available = available.scatter(1, idx, False)
        chosen.append(idx)
    if not chosen:
        return torch.zeros(b, 0, dtype=torch.long, device=x.device)
    return torch.cat(chosen, dim=1).sort(dim=1).values


def _pivot_turns(rows: Tensor, keys: Tensor | None, extra_keys: Tensor | None,
                 scores: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The token pivots' rows, in DART's insertion order when `keys` are given, and each
    turn's pivot ``[B, P]`` (None: the pivots' own order)."""
    if keys is None:
        return rows, None
    if scores is not None:
        rows = rows.gather(1, scores.gather(1, rows).float().argsort(dim=1, descending=True, stable=True))
    pkeys = [keys.gather(1, rows)] + ([] if extra_keys is None else [extra_keys])
    return rows, dart_order(torch.cat(pkeys, dim=1))


def _pivot_row(sim: Tensor, i: int | Tensor) -> Tensor:
    """``[B, n]``: each row's similarities to its pivot `i` (one index, or one per row)."""
    if isinstance(i, int):
        return sim[:, i]
    return sim.gather(1, i.view(-1, 1, 1).expand(-1, 1, sim.shape[2]))[:, 0]


def dart_order(keys: Tensor) -> Tensor:
    """``[B, P]`` int64: the turn of each pivot in DART's walk, per row.

    DART (ZichenWen1/DART, ``get_retained_image_token``) iterates
    ``set(image_indices + query_indices).copy()``: the pivots' prompt positions, image
    pivots first in ``topk`` order. A set of small ints iterates in hash-table slot order
    (hash = value; the slot depends on the table size, which grows while the set is
    built, and on collisions, hence on insertion order), so the order is rebuilt here by
    building the same set, in the same insertion order, with this interpreter: CPython's
    set layout has not changed since 3.7. `keys` ``[B, P]`` are the positions in
    insertion order; equal keys in a row would collapse in DART's set and are an error.
    """
    turns = []
    for row in keys.tolist():
        walk = list(set(row).copy())  # the set DART builds, and the copy it walks
        if len(walk) != len(row):
            raise ValueError("two pivots share a prompt position")
        place = {k: i for i, k in enumerate(row)}
        turns.append([place[k] for k in walk])
    return torch.tensor(turns, dtype=torch.long, device=keys.device).view(keys.shape[0], -1)


# --------------------------------------------------------------------------- score-free
def uniform(candidates_mask: Tensor, k: int) -> Tensor:
    """Evenly strided tokens among each sample's candidates, in position order.

    Parameters
    ----------
    candidates_mask : Tensor
        ``[B, n]`` bool, True = may be selected (``c_b`` candidates in sample b).
    k : int
        Tokens to select (``k <= c_b``).

    Notes
    -----
    The i-th pick (``i = 0..k-1``) is the candidate of rank ``floor(i * c_b / k)`` in
    position order: it starts at the first candidate and spreads the picks over all of
    them (when k divides c_b this is the plain stride ``c_b / k``, as in VisionZip's
    target choice). Ranks strictly increase because ``c_b >= k``.
    """
    b, n = candidates_mask.shape
    _check_k(k, n)
    if k == 0:
        return _empty(b, candidates_mask.device)
    _check_available(candidates_mask, k, "uniform")
    c = candidates_mask.sum(dim=1)  # [B]
    # candidates first, in position order
    order = torch.sort((~candidates_mask).to(torch.int8), dim=1, stable=True).indices
    i = torch.arange(k, device=candidates_mask.device)
    ranks = torch.div(i[None, :] * c[:, None], k, rounding_mode="floor")
    return order.gather(1, ranks)


def random_keys(seed: int, batch: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """The random sort keys `random` draws: ``[batch, n]`` uniforms from a CPU generator.

    Drawn on the CPU so that a seed gives the same tokens on every device; row b depends
    only on (seed, b, n), not on the batch size.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return torch.rand(batch, n, generator=g).to(device)


def random(
    candidates_mask: Tensor,
    k: int,
    *,
    seed: int | None = 0,
    keys: Tensor | None = None,
) -> Tensor:
    """k candidates chosen uniformly at random, independently per sample.

    Parameters
    ----------
    candidates_mask : Tensor
        ``[B, n]`` bool, True = may be selected.
    k : int
        Tokens to select.
    seed : int, optional
        Seed of a private ``torch.Generator`` (the global RNG is untouched); None means 0.
    keys : Tensor, optional
        ``[B, n]`` precomputed `random_keys` (lets a caller draw once for a full batch and
        select on sub-batches).

    Returns
    -------
    Tensor
        ``[B, k]`` int64 indices, ascending. Same seed, same indices.

    Notes
    -----
    Each token gets a uniform key; the k candidates with the smallest keys win (a
    uniformly random k-subset, ties by lower index).
    """
    b, n = candidates_mask.shape
    _check_k(k, n)
    if k == 0:
        return _empty(b, candidates_mask.device)
    _check_available(candidates_mask, k, "random")
    if keys is None:
        keys = random_keys(0 if seed is None else seed, b, n, candidates_mask.device)
    keys = keys.float().masked_fill(~candidates_mask, 2.0)  # non-candidates after all
    order = torch.sort(keys, dim=1, stable=True).indices
    return _finish(order, k)


# --------------------------------------------------------------------------- spatial
def neighbour_mask(kept_mask: Tensor, positions: Tensor, grid: tuple[int, int]) -> Tensor:
    """Tokens that are a 4-neighbour of a kept token on the grid (kept tokens excluded).

    Parameters
    ----------
    kept_mask : Tensor
        ``[B, n]`` bool.
    positions : Tensor
        ``[B, n]`` or ``[n]`` raster grid index of each token; negative = off-grid.
    grid : (int, int)
        ``(rows, cols)``.

    Returns
    -------
    Tensor
        ``[B, n]`` bool. Neighbours are ``(r±1, c)`` and ``(r, c±1)`` inside the grid: no
        wrap-around from the end of one row to the start of the next.
    """
    rows, cols = grid
    b, n = kept_mask.shape
    pos = _batch_positions(positions, b).to(kept_mask.device)
    cells = rows * cols
    on_grid = (pos >= 0) & (pos < cells)
    slot = torch.where(on_grid, pos, torch.full_like(pos, cells))  # off-grid -> dump slot
    occ = torch.zeros(b, cells + 1, dtype=torch.int32, device=kept_mask.device)
    occ.scatter_add_(1, slot, (kept_mask & on_grid).to(torch.int32))
    occ2 = occ[:, :cells].view(b, rows, cols) > 0
    nb = torch.zeros_like(occ2)
    nb[:, 1:, :] |= occ2[:, :-1, :]
    nb[:, :-1, :] |= occ2[:, 1:, :]
    nb[:, :, 1:] |= occ2[:, :, :-1]
    nb[:, :, :-1] |= occ2[:, :, 1:]
    nb_flat = torch.cat([nb.view(b, cells), torch.zeros(b, 1, dtype=torch.bool, device=nb.device)], 1)
    return nb_flat.gather(1, slot) & on_grid & ~kept_mask


def buffers(
    kept_mask: Tensor,
    positions: Tensor,
    grid: tuple[int, int],
    k: int,
    *,
    order_scores: Tensor | None = None,
    exclude: Tensor | None = None,
) -> Tensor:
    """Spatial buffers: 4-neighbours of the kept tokens (HiPrune), exactly k of them.

    Parameters
    ----------
    kept_mask, positions, grid
        As in `neighbour_mask`; the kept tokens are the anchors.
    k : int
        Tokens to return.
    order_scores : Tensor, optional
        ``[B, n]``; ranks the neighbours (descending) and chooses the padding. Without
        it both follow position order.
    exclude : Tensor, optional
        ``[B, n]`` bool: tokens that may not be chosen.

    Notes
    -----
    Candidates are the present, not kept, not excluded tokens at ``(r±1, c)`` /
    ``(r, c±1)`` of a kept token. If there are more than k, the k best by
    ``order_scores`` are taken (ties: lower index); if fewer, the rest is padded with
    the best remaining non-neighbours by ``order_scores``. HiPrune's released code forms
    neighbours as flat ``index ± 1`` / ``index ± width`` clamped to the range, which
    wraps across row ends; here a row end has no right neighbour.
    """
    b, n = kept_mask.shape
    _check_k(k, n)
    if k == 0:
        return _empty(b, kept_mask.device)
    allowed = ~kept_mask if exclude is None else ~kept_mask & ~exclude
    _check_available(allowed, k, "buffers")
    is_nb = neighbour_mask(kept_mask, positions, grid) & allowed
    # group 0: neighbours, 1: other allowed tokens (padding), 2: never
    group = torch.where(is_nb, 0, torch.where(allowed, 1, 2))
    s = torch.zeros(b, n, device=kept_mask.device) if order_scores is None else _as_scores(order_scores)
    return _finish(_lexsort(s, group), k)


def split_chunks(n: int, chunks: int, device=None) -> Tensor:
    """Chunk id of each of n tokens cut into `chunks` contiguous runs in order, the first
    ``n % chunks`` runs one token longer (HoloV's crops). ``[n]`` int64."""
    if not 1 <= chunks <= n:
        raise ValueError(f"cannot cut {n} tokens into {chunks} chunks")
    size, extra = divmod(n, chunks)
    lengths = torch.full((chunks,), size, dtype=torch.long, device=device)
    lengths[:extra] += 1
    return torch.repeat_interleave(torch.arange(chunks, device=device), lengths)


def split_regions(positions: Tensor, grid: tuple[int, int], rows: int, cols: int) -> Tensor:
    """Region id of each token for an even ``rows x cols`` split of the grid.

    Parameters
    ----------
    positions : Tensor
        ``[B, n]`` or ``[n]`` raster grid positions (negative = off-grid).
    grid : (int, int)
        ``(R, C)`` of the token grid.
    rows, cols : int
        The region split.

    Returns
    -------
    Tensor
        int64 region ids, raster order ``rr*cols + rc`` with ``rr = floor(r*rows/R)``
        and ``rc = floor(c*cols/C)`` (sizes differ by at most one row/column);
        -1 for off-grid tokens.
    """
    big_r, big_c = grid
    if not (1 <= rows <= big_r and 1 <= cols <= big_c):
        raise ValueError(f"cannot split a {big_r}x{big_c} grid into {rows}x{cols} regions")
    pos = positions.long()
    on_grid = (pos >= 0) & (pos < big_r * big_c)
    p = pos.clamp(min=0)
    r = torch.div(p, big_c, rounding_mode="floor")
    c = p % big_c
    rr = torch.div(r * rows, big_r, rounding_mode="floor")
    rc = torch.div(c * cols, big_c, rounding_mode="floor")
    return torch.where(on_grid, rr * cols + rc, torch.full_like(pos, -1))


def proportional_shares(scores: Tensor, region_ids: Tensor, num_regions: int, k: int) -> Tensor:
    """Tokens per region in proportion to each region's mean score (HoloV's crop budget).

    Parameters
    ----------
    scores : Tensor
        ``[B, n]`` token scores (negative values count as 0).
    region_ids : Tensor
        ``[B, n]`` int64 region of each token (-1: none).
    num_regions : int
        G.
    k : int
        Total tokens.

    Returns
    -------
    Tensor
        ``[B, G]`` int64, each row summing to k.

    Notes
    -----
    Region g gets ``floor(k * m_g / sum(m))`` where ``m_g`` is the mean score of its
    tokens; the tokens the floors leave over go one each to the regions of highest mean
    (lowest index on ties), round after round. All-zero means split evenly. A region
    that cannot supply its share leaves the rest to `per_region`'s global fill.
    """
    b = scores.shape[0]
    s = scores.float().clamp(min=0)
    valid = region_ids >= 0
    ids = region_ids.clamp(min=0)
    total = torch.zeros(b, num_regions, device=scores.device).scatter_add_(1, ids, s * valid)
    count = torch.zeros(b, num_regions, device=scores.device).scatter_add_(1, ids, valid.float())
    mean = total / count.clamp(min=1)
    norm = mean.sum(dim=1, keepdim=True)
    even = norm <= 0
    mean = torch.where(even, torch.ones_like(mean), mean)
    norm = torch.where(even, torch.full_like(norm, float(num_regions)), norm)
    base = torch.floor(k * mean / norm).long()
    left = k - base.sum(dim=1)
    # rank regions by mean (stable: lowest index first on ties) and hand out the rest
    order = torch.sort(-mean, dim=1, stable=True).indices
    rounds, extra = torch.div(left, num_regions, rounding_mode="floor"), left % num_regions
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_regions, device=scores.device).expand(b, -1))
    return base + rounds[:, None] + (rank < extra[:, None]).long()


def softmax_shares(scores: Tensor, region_ids: Tensor, num_regions: int, k: int, temperature: float) -> Tensor:
    """Tokens per region by VidCom2's frame budget (xuyang-liu16/VidCom2 @ 944a17d,
    token_compressor/vidcom2/vidcom2.py, `compute_scales` and `select_outlier_indices`,
    lines 64-78).

    Parameters
    ----------
    scores : Tensor
        ``[B, n]`` token scores; a region weighs by its mean.
    region_ids : Tensor
        ``[B, n]`` int64 region of each token (-1: none).
    num_regions, k, temperature
        G; the total tokens, which each row of the ``[B, G]`` int64 result adds up to; T.

    Notes
    -----
    Over the regions holding tokens, p = softmax(m / T) of their mean scores m, and region g
    gets ``round(min(1, b·(1 + p_g - mean(p))) · c_g)``, at least 1, at most its c_g
    tokens, with b = k / (tokens in all regions): VidCom2's ``round(scale · tokens per
    frame)``. VidCom2 keeps whatever those roundings add up to; here a total off k is
    brought back to k one token at a time, taking from the regions rounded up most (or
    giving to those rounded down most; ties: lowest index).
    """
    b = scores.shape[0]
    valid = region_ids >= 0
    ids = region_ids.clamp(min=0)
    total = torch.zeros(b, num_regions, device=scores.device).scatter_add_(1, ids, scores.float() * valid)
    count = torch.zeros(b, num_regions, device=scores.device).scatter_add_(1, ids, valid.float())
    present = count > 0
    mean = torch.where(present, total / count.clamp(min=1), torch.full_like(total, float("-inf")))
    top = mean.max(dim=1, keepdim=True).values
    probs = torch.softmax((mean - top) / temperature, dim=1)
    probs_mean = probs.sum(dim=1, keepdim=True) / present.sum(dim=1, keepdim=True).clamp(min=1)
    base = k / count.sum(dim=1, keepdim=True).clamp(min=1)
    scale = (base * (1 + probs - probs_mean)).clamp(max=1.0)
    raw = torch.where(present, scale * count, torch.zeros_like(scale))
    shares = torch.minimum(torch.round(raw).clamp(min=1), count) * present
    return torch.stack([_to_total(shares[i], raw[i], count[i], k) for i in range(b)]).long()


def _to_total(shares: Tensor, raw: Tensor, cap: Tensor, k: int) -> Tensor:
    """`shares` ``[G]`` moved one token at a time until they add up to k: the regions whose
    rounding gave the most (took the most) first, never below 1 while k allows (then 0)
    nor above `cap`."""
    shares = shares.clone()
    floor = 1 if k >= int((cap > 0).sum()) else 0
    while int(shares.sum()) != k:
        give = int(shares.sum()) < k
        off = raw - shares  # > 0: rounded down
        room = (shares < cap) if give else (shares > floor) & (cap > 0)
        key = torch.where(room, -off if give else off, torch.full_like(off, float("inf")))
        g = int(torch.argmin(key))  # argmin: the first on ties
        if not bool(room[g]):
            break  # nothing can move (k beyond the tokens): per_region's fill takes over
        shares[g] += 1 if give else -1
    return shares


SelectFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""``select_fn(count, allowed, taken, rows) -> idx [b', count]`` on the sub-batch ``rows``:
``allowed`` ``[b', n]`` = tokens it may choose, ``taken`` ``[b', n]`` = tokens kept so far."""


def per_region(
    select_fn: SelectFn,
    k: int,
    region_ids: Tensor,
    num_regions: int,
    *,
    taken: Tensor | None = None,
    exclude: Tensor | None = None,
    shares: Tensor | None = None,
) -> Tensor:
    """Split a budget of k tokens across regions (evenly, or as `shares` say) and select
    within each.

    Parameters
    ----------
    select_fn : SelectFn
        ``select_fn(count, allowed, taken, rows)``: selects ``count`` tokens among
        ``allowed`` for the samples ``rows`` (int64 ``[b']``); ``taken`` holds the tokens
        kept before, including this call's picks in earlier regions (seeds for `diverse`).
    k : int
        Total tokens.
    region_ids : Tensor
        ``[B, n]`` int64 region of each token (`split_regions`; -1 = no region).
    num_regions : int
        Number of regions G.
    taken, exclude : Tensor, optional
        ``[B, n]`` bool: tokens already kept / never selectable.
    shares : Tensor, optional
        ``[B, G]`` int64 tokens per region, each row summing to k
        (`proportional_shares`); default the even split.

    Notes
    -----
    By default region g (raster order) gets ``k // G`` tokens, plus one for the first
    ``k % G`` regions. A region with fewer available tokens than its share gives all it has, and
    the shortfall is filled by one more ``select_fn`` call over all remaining tokens
    (the globally best remaining). Samples whose counts differ are handled in groups,
    so each sample's result does not depend on the rest of the batch.
    """
    b, n = region_ids.shape
    device = region_ids.device
    _check_k(k, n)
    if num_regions < 1:
        raise ValueError(f"num_regions must be >= 1, got {num_regions}")
    taken = torch.zeros(b, n, dtype=torch.bool, device=device) if taken is None else taken.clone()
    free = ~taken if exclude is None else ~taken & ~exclude
    _check_available(free, k, "per_region")
    picked = torch.zeros(b, n, dtype=torch.bool, device=device)

    def run(count: Tensor, allowed: Tensor) -> None:
        for value in torch.unique(count).tolist():
            if value == 0:
                continue
            rows = (count == value).nonzero().squeeze(1)
            idx = select_fn(int(value), allowed[rows], (taken | picked)[rows], rows)
            sub = picked[rows]
            sub.scatter_(1, idx, True)
            picked[rows] = sub

    if shares is None:
        base, extra = divmod(k, num_regions)
        shares = torch.tensor([base + (1 if g < extra else 0) for g in range(num_regions)], device=device)
        shares = shares[None].expand(b, -1)
    elif tuple(shares.shape) != (b, num_regions) or bool((shares.sum(dim=1) != k).any()):
        raise ValueError(f"shares must be [{b}, {num_regions}] with rows summing to {k}")
    for g in range(num_regions):
        in_region = free & (region_ids == g)
        run(torch.minimum(in_region.sum(dim=1), shares[:, g]), in_region)
    leftover = k - picked.sum(dim=1)
    if bool((leftover > 0).any()):
        run(leftover, free & ~picked)
    if bool((picked.sum(dim=1) != k).any()):
        raise RuntimeError("per_region: select_fn returned overlapping or disallowed tokens")
    return picked.nonzero()[:, 1].view(b, k)
