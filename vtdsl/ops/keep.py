"""`keep term + term + ...`: evaluate a union of selection terms left to right."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from . import select as sel
from .similarity import pairwise_cosine

TermKind = Literal["top", "diverse", "diverse_sum", "uniform", "random", "unique", "buffers", "far"]

__all__ = ["TermSpec", "select_union"]


@dataclass(frozen=True, eq=False)
class TermSpec:
    """One term of a keep stage, with its runtime inputs.

    Attributes
    ----------
    kind : {"top", "diverse", "diverse_sum", "uniform", "random", "unique", "buffers"}
        The selector.
    count : int
        Tokens this term adds (resolved; buffers: exactly this many, padded if needed).
    scores : Tensor, optional
        ``[B, n]`` scores; required by ``top``.
    seed : int, optional
        Seed of ``random`` (None means 0).
    per_pivot : int
        ``far``: tokens each pivot keeps (`count` = per_pivot x pivots).
    pivots : Tensor, optional
        ``far``: ``[B, m, d]`` features of pivots besides the tokens kept so far (DART's
        text pivots).
    features : Tensor, optional
        ``far``: ``[B, n, d]`` features to compare instead of the stage's `features`.
    """

    kind: TermKind
    count: int
    scores: Tensor | None = None
    seed: int | None = None
    per_pivot: int = 0
    pivots: Tensor | None = None
    features: Tensor | None = None


def _batch_size(*tensors: Tensor | None) -> tuple[int, torch.device]:
    for t in tensors:
        if t is not None and t.dim() >= 2:  # a 1-D tensor is shared by the batch
            return t.shape[0], t.device
    raise ValueError("select_union cannot infer the batch size: pass batch=")


def select_union(
    terms: list[TermSpec] | tuple[TermSpec, ...],
    *,
    n: int,
    positions: Tensor | None = None,
    grid: tuple[int, int] | None = None,
    features: Tensor | None = None,
    exclude: Tensor | None = None,
    region_ids: Tensor | None = None,
    num_regions: int | None = None,
    region_weights: Tensor | None = None,
    batch: int | None = None,
    return_terms: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Select the union of several terms, each choosing among tokens not yet kept.

    Parameters
    ----------
    terms : sequence of TermSpec
        Evaluated left to right; term i never picks a token kept by terms ``< i``.
    n : int
        Tokens in the stage.
    positions : Tensor, optional
        ``[B, n]`` / ``[n]`` raster grid positions; required by ``buffers``.
    grid : (int, int), optional
        ``(rows, cols)``; required by ``buffers``.
    features : Tensor, optional
        ``[B, n, d]``; required by ``diverse`` / ``unique``. Their cosine matrix is
        computed once per call and shared by all such terms (``2·n²·d`` once per stage).
    exclude : Tensor, optional
        ``[B, n]`` bool: tokens no term may pick.
    region_ids, num_regions : optional
        ``per region`` / ``per crop``: every term's count is split across the regions
        with `select.per_region`.
    region_weights : Tensor, optional
        ``[B, n]`` token scores: each term's count is shared across the regions in
        proportion to their mean score (`select.proportional_shares`) instead of evenly.
    batch : int, optional
        Batch size, needed only when no tensor argument carries it.
    return_terms : bool
        Also return which term picked each kept token.

    Returns
    -------
    Tensor or (Tensor, Tensor)
        ``[B, sum(count)]`` int64 kept indices, ascending; with ``return_terms`` also the
        ``[B, sum(count)]`` int64 term index of each.

    Notes
    -----
    How each kind sees the tokens kept by earlier terms ("taken"):

    - ``top``: excluded; ranks its own ``scores``.
    - ``diverse`` / ``unique``: taken tokens are the seeds the distances start from
      (e.g. a diverse term after a top term complements the top tokens).
    - ``far``: taken tokens are the pivots, each keeping its least similar tokens.
    - ``uniform`` / ``random``: strided / drawn over the remaining tokens.
    - ``buffers``: neighbours of the tokens taken *before this term*, ordered and padded
      by the first term's scores (position order when the first term has none).
    """
    carriers = [*(t.scores for t in terms), features, positions, exclude, region_ids]
    if batch is None:
        b, device = _batch_size(*carriers)
    else:
        b = batch
        device = next((t.device for t in carriers if t is not None), torch.device("cpu"))
    if (region_ids is None) != (num_regions is None):
        raise ValueError("region_ids and num_regions go together")
    if region_ids is not None and region_ids.dim() == 1:
        region_ids = region_ids[None].expand(b, -1)

    taken = torch.zeros(b, n, dtype=torch.bool, device=device)
    term_of = torch.full((b, n), -1, dtype=torch.long, device=device)
    blocked = exclude if exclude is not None else torch.zeros(b, n, dtype=torch.bool, device=device)
    sim: Tensor | None = None
    order_scores = terms[0].scores if terms else None

    for ti, term in enumerate(terms):
        if term.count == 0:
            continue
        kind = term.kind
        if kind == "top":
            if term.scores is None:
                raise ValueError(f"term {ti} ('top') needs scores")
            scores = term.scores

            def fn(c, allowed, tk, rows, scores=scores):
                return sel.topk(scores[rows], c, exclude=~allowed)

        elif kind in ("diverse", "diverse_sum", "unique"):
            if features is None:
                raise ValueError(f"term {ti} ('{kind}') needs features")
            if sim is None:
                sim = pairwise_cosine(features)
            greedy = {"diverse": sel.diverse, "diverse_sum": sel.diverse_sum, "unique": sel.unique}[kind]

            def fn(c, allowed, tk, rows, greedy=greedy, sim=sim):
                return greedy(None, c, seed_mask=tk, exclude=~allowed, sim=sim[rows])

        elif kind == "far":
            feats = term.features if term.features is not None else features
            if feats is None:
                raise ValueError(f"term {ti} ('far') needs features")

            def fn(c, allowed, tk, rows, term=term, feats=feats):
                extra = None if term.pivots is None else term.pivots[rows]
                return sel.far(feats[rows], tk, term.per_pivot, extra_pivots=extra, exclude=~allowed & ~tk)

        elif kind == "uniform":

            def fn(c, allowed, tk, rows):
                return sel.uniform(allowed, c)

        elif kind == "random":
            keys = sel.random_keys(0 if term.seed is None else term.seed, b, n, device)

            def fn(c, allowed, tk, rows, keys=keys):
                return sel.random(allowed, c, keys=keys[rows])

        elif kind == "buffers":
            if positions is None or grid is None:
                raise ValueError(f"term {ti} ('buffers') needs positions and grid")
            anchors = taken.clone()
            pos_b = positions[None].expand(b, -1) if positions.dim() == 1 else positions
            osc = order_scores

            def fn(c, allowed, tk, rows, anchors=anchors, pos_b=pos_b, osc=osc):
                return sel.buffers(
                    anchors[rows],
                    pos_b[rows],
                    grid,
                    c,
                    order_scores=None if osc is None else osc[rows],
                    exclude=~allowed,
                )

        else:
            raise ValueError(f"unknown term kind {kind!r}")

        if region_ids is None:
            rows = torch.arange(b, device=device)
            idx = fn(term.count, ~taken & ~blocked, taken, rows)
        else:
            shares = None
            if region_weights is not None:
                shares = sel.proportional_shares(region_weights, region_ids, num_regions, term.count)
            idx = sel.per_region(fn, term.count, region_ids, num_regions, taken=taken, exclude=blocked,
                                 shares=shares)
        taken.scatter_(1, idx, True)
        term_of.scatter_(1, idx, ti)

    total = sum(t.count for t in terms)
    kept = taken.nonzero()[:, 1].view(b, total)
    if return_terms:
        return kept, term_of.gather(1, kept)
    return kept
