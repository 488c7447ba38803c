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
    keys, pivot_keys : Tensor, optional
        ``far``: ``[B, n]`` prompt positions of the candidates and ``[B, m]`` of `pivots`;
        given, the pivots take turns in DART's set order (`vtdsl.ops.select.dart_order`).
    """

    kind: TermKind
    count: int
    scores: Tensor | None = None
    seed: int | None = None
    per_pivot: int = 0
    pivots: Tensor | None = None
    features: Tensor | None = None
    keys: Tensor | None = None
    pivot_keys: Tensor | None = None


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
    region_softmax: float | None = None,
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
    positions, grid : optional
        ``[B, n]`` / ``[n]`` raster grid positions and ``(rows, cols)``; required by ``buffers``.
    features : Tensor, optional
        ``[B, n, d]``; required by ``diverse`` / ``unique``. Their cosine matrix is
        computed once per call and shared by all such terms (``2·n²·d`` once per stage).
    exclude : Tensor, optional
        ``[B, n]`` bool: tokens no term may pick.
    region_ids, num_regions : optional
        ``per region`` / ``per crop``: every term's count is split across the regions
        with `select.per_region`.
    region_weights, region_softmax : optional
        ``[B, n]`` token scores: each term's count is shared across the regions in proportion
        to their mean score (`select.proportional_shares`) instead of evenly; with
        `region_softmax` T, by VidCom2's rule at T (`select.softmax_shares`).
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
    b, device = _batch_and_device(terms, batch, features, positions, exclude, region_ids)
    if (region_ids is None) != (num_regions is None):
        raise ValueError("region_ids and num_regions go together")
    if region_ids is not None and region_ids.dim() == 1:
        region_ids = region_ids[None].expand(b, -1)
    stage = _Stage(b, n, device, features, positions, grid, terms[0].scores if terms else None,
                   taken=torch.zeros(b, n, dtype=torch.bool, device=device),
                   blocked=exclude if exclude is not None else torch.zeros(b, n, dtype=torch.bool, device=device))
    term_of = torch.full((b, n), -1, dtype=torch.long, device=device)
    weighting = (region_weights, region_softmax)
    for ti, term in enumerate(terms):
        if term.count == 0:
            continue
        idx = stage.pick(_selector(ti, term, stage), term.count, region_ids, num_regions, weighting)
        stage.taken.scatter_(1, idx, True)
        term_of.scatter_(1, idx, ti)
    kept = stage.taken.nonzero()[:, 1].view(b, sum(t.count for t in terms))
    if return_terms:
        return kept, term_of.gather(1, kept)
    return kept


def _batch_and_device(terms, batch: int | None, *carriers: Tensor | None) -> tuple[int, torch.device]:
    carriers = (*(t.scores for t in terms), *carriers)
    if batch is None:
        return _batch_size(*carriers)
    return batch, next((t.device for t in carriers if t is not None), torch.device("cpu"))


@dataclass(eq=False)
class _Stage:
    """What the terms of one `select_union` call share: its inputs, the tokens taken so
    far, and the cosine matrix, computed at the first term that needs it."""

    b: int
    n: int
    device: torch.device
    features: Tensor | None
    positions: Tensor | None
    grid: tuple[int, int] | None
    order_scores: Tensor | None  # the first term's scores: buffers order by them
    taken: Tensor
    blocked: Tensor  # `exclude`: no term may pick these
    sim: Tensor | None = None

    def similarity(self) -> Tensor:
        if self.sim is None:
            self.sim = pairwise_cosine(self.features)
        return self.sim

    def pick(self, fn, count: int, region_ids: Tensor | None, num_regions: int | None,
             weighting: tuple[Tensor | None, float | None]) -> Tensor:
        """`count` tokens chosen by the selector `fn`, over the whole stage or shared
        across the regions (evenly, or by `region_weights`)."""
        if region_ids is None:
            rows = torch.arange(self.b, device=self.device)
            return fn(count, ~self.taken & ~self.blocked, self.taken, rows)
        shares, (region_weights, softmax) = None, weighting
        if region_weights is not None and softmax is not None:
            shares = sel.softmax_shares(region_weights, region_ids, num_regions, count, softmax)
        elif region_weights is not None:
            shares = sel.proportional_shares(region_weights, region_ids, num_regions, count)
        return sel.per_region(fn, count, region_ids, num_regions, taken=self.taken, exclude=self.blocked,
                              shares=shares)


# Each builder checks a term's inputs and returns its selector
# ``fn(count, allowed [B', n], taken [B', n], rows [B']) -> [B', count]`` over the batch
# rows `rows` (all rows, or one region's share under `per_region`).
def _top(ti: int, term: TermSpec, stage: _Stage):
    if term.scores is None:
        raise ValueError(f"term {ti} ('top') needs scores")
    scores = term.scores
    return lambda c, allowed, tk, rows: sel.topk(scores[rows], c, exclude=~allowed)


_GREEDY = {"diverse": sel.diverse, "diverse_sum": sel.diverse_sum, "unique": sel.unique}


def _greedy(ti: int, term: TermSpec, stage: _Stage):
    if stage.features is None:
        raise ValueError(f"term {ti} ('{term.kind}') needs features")
    sim, greedy = stage.similarity(), _GREEDY[term.kind]
    return lambda c, allowed, tk, rows: greedy(None, c, seed_mask=tk, exclude=~allowed, sim=sim[rows])


def _far(ti: int, term: TermSpec, stage: _Stage):
    feats = term.features if term.features is not None else stage.features
    if feats is None:
        raise ValueError(f"term {ti} ('far') needs features")

    def fn(c, allowed, tk, rows):
        extra = None if term.pivots is None else term.pivots[rows]
        keys = None if term.keys is None else term.keys[rows]
        extra_keys = None if term.pivot_keys is None else term.pivot_keys[rows]
        order = None if stage.order_scores is None else stage.order_scores[rows]
        return sel.far(feats[rows], tk, term.per_pivot, extra_pivots=extra, exclude=~allowed & ~tk,
                       keys=keys, extra_keys=extra_keys, pivot_scores=order)

    return fn


def _uniform(ti: int, term: TermSpec, stage: _Stage):
    return lambda c, allowed, tk, rows: sel.uniform(allowed, c)


def _random(ti: int, term: TermSpec, stage: _Stage):
    keys = sel.random_keys(0 if term.seed is None else term.seed, stage.b, stage.n, stage.device)
    return lambda c, allowed, tk, rows: sel.random(allowed, c, keys=keys[rows])


def _buffers(ti: int, term: TermSpec, stage: _Stage):
    if stage.positions is None or stage.grid is None:
        raise ValueError(f"term {ti} ('buffers') needs positions and grid")
    anchors = stage.taken.clone()  # the tokens taken before this term, not by it
    positions = stage.positions
    pos_b = positions[None].expand(stage.b, -1) if positions.dim() == 1 else positions
    osc, grid = stage.order_scores, stage.grid

    def fn(c, allowed, tk, rows):
        return sel.buffers(anchors[rows], pos_b[rows], grid, c,
                           order_scores=None if osc is None else osc[rows], exclude=~allowed)

    return fn


_SELECTORS = {"top": _top, "diverse": _greedy, "diverse_sum": _greedy, "unique": _greedy, "far": _far,
              "uniform": _uniform, "random": _random, "buffers": _buffers}


def _selector(ti: int, term: TermSpec, stage: _Stage):
    build = _SELECTORS.get(term.kind)
    if build is None:
        raise ValueError(f"unknown term kind {term.kind!r}")
    return build(ti, term, stage)
