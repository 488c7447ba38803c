"""Adaptive counts: how many tokens a `top N by ...` term keeps, decided from the scores.

One count per call (per batch of images): the selection ops keep the same number of
tokens in every row, so a batch shares the count its images' rule gives — the largest
outlier count (no image loses an outlier), and for the entropy rule the largest removal,
as FlowCut's release does (`adaptive_prune_ratio`: ``r.max(0)``). For one image both are
exactly the published rule. No matmuls.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["outlier_count", "entropy_count", "normalised_entropy"]


def outlier_count(scores: Tensor, bound: int) -> int:
    """PruMerge's count: tokens scoring above ``Q3 + 1.5 * (Q3 - Q1)`` of their row
    (quartiles interpolated linearly, numpy's default), at least 1, at most `bound`.

    ``scores [G, n]`` (NaN = not a candidate, ignored) -> the largest count over rows.
    """
    s = scores.float()
    q1, q3 = torch.nanquantile(s, torch.tensor([0.25, 0.75], device=s.device), dim=1)  # [G] each
    upper = q3 + 1.5 * (q3 - q1)
    per_row = (s > upper[:, None]).sum(1)
    return int(min(max(int(per_row.max()) if per_row.numel() else 0, 1), bound))


def normalised_entropy(weights: Tensor) -> Tensor:
    """``[G, n]`` non-negative weights -> ``[G]`` entropy of ``w / sum(w)`` divided by
    ``log n`` (in [0, 1]; 0 log 0 = 0). NaN weights are left out of the sum and of n;
    negative ones count as 0; a row with nothing to weigh is flat (1)."""
    w = weights.float()
    seen = ~torch.isnan(w)
    w = torch.where(seen, w, torch.zeros_like(w)).clamp(min=0)  # a negative weight counts as 0
    total = w.sum(1, keepdim=True)
    p = w / total.clamp(min=torch.finfo(w.dtype).tiny)
    n = seen.sum(1).clamp(min=2).float()
    h = -torch.special.xlogy(p, p).sum(1) / torch.log(n)
    return torch.where(total[:, 0] > 0, h, torch.ones_like(h))  # nothing to weigh: flat


def entropy_count(weights: Tensor, available: int, target: int, steps: int) -> int:
    """FlowCut's count: of the `available` tokens, ``round((available - target) *
    (1 - H^2) / sqrt(steps))`` are removed (H = `normalised_entropy` of `weights`, the
    batch removing its rows' largest amount), never leaving fewer than `target`.

    A flat distribution (H = 1) removes nothing; a peaked one (H = 0) removes
    ``(available - target) / sqrt(steps)``: the cut is spread over the `steps` layers left.
    """
    if available <= target:
        return available
    h = normalised_entropy(weights)
    removed = torch.round((available - target) / math.sqrt(steps) * (1 - h * h))
    r = int(removed.max()) if removed.numel() else 0
    return max(available - max(r, 0), target)
