"""Adaptive counts: how many tokens a `top N by ...` term keeps, decided from the scores.

One count per call (per batch of images): the selection ops keep the same number of
tokens in every row, so a batch shares the count its images' rule gives — the largest
outlier count (no image loses an outlier), and for the entropy rule the largest removal,
as FlowCut's release does (`adaptive_prune_ratio`: ``r.max(0)``). For one image both are
exactly the published rule. No matmuls.

`lof_outliers` / `lof_count`: Recoverable Compression's count (the share of a 1-D score
that scikit-learn's ``LocalOutlierFactor(n_neighbors=K, contamination="auto")`` calls
outliers), computed here in torch so that no scikit-learn is needed at run time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["outlier_count", "entropy_count", "normalised_entropy", "lof_outliers", "lof_count"]


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


def lof_outliers(values: Tensor, neighbours: int) -> Tensor:
    """``[G, m]`` 1-D samples per row -> ``[G]`` how many LOF calls outliers.

    scikit-learn's rule (``neighbors/_lof.py``), in float64 as it computes: K = min(
    `neighbours`, m - 1); each sample's K nearest others (self excluded; among equal
    distances the lower index, where sklearn's tree order decides — only exact ties
    between distinct samples can differ, as duplicates share every quantity below);
    reach(p, o) = max(k-distance(o), |p - o|); lrd(p) = 1 / (mean reach + 1e-10); LOF(p)
    = mean of lrd(o) / lrd(p) over the neighbours; outlier when LOF > 1.5 (the "auto"
    contamination's offset)."""
    x = values.double()
    g, m = x.shape
    k = min(neighbours, m - 1)
    if k < 1:
        return torch.zeros(g, dtype=torch.long, device=x.device)
    dist = (x[:, :, None] - x[:, None, :]).abs()
    dist.diagonal(dim1=1, dim2=2).fill_(math.inf)  # a sample is not its own neighbour
    near, idx = dist.sort(dim=2, stable=True)
    near, idx = near[..., :k], idx[..., :k]  # [G, m, K]
    flat = idx.reshape(g, m * k)
    k_distance = near[..., -1]
    reach = torch.maximum(near, k_distance.gather(1, flat).view(g, m, k))
    lrd = 1.0 / (reach.mean(2) + 1e-10)
    lof = (lrd.gather(1, flat).view(g, m, k) / lrd[:, :, None]).mean(2)
    return (lof > 1.5).sum(1)


def lof_count(scores: Tensor, kept: Tensor, neighbours: int, of_rest: bool, bound: int) -> int:
    """Recoverable Compression's count for a term after earlier terms kept `kept`
    (``[G, n]`` bool, the same number per row).

    Default: the LOF outlier share of the row's scores, the kept tokens' replaced by the
    row's minimum (as RC masks the visual top before its text count), of the tokens still
    available: ``int(available * (c / n))``. `of_rest`: the share among the tokens not
    kept, their scores alone, of the tokens kept so far: ``int(kept * (c / rest))`` (RC's
    cluster count reuses the kept count there). Python floats, as RC's numpy ratio; the
    batch keeps its rows' largest count, at most `bound`, at most what is available.
    """
    s = scores.double()
    g, n = s.shape
    taken = int(kept[0].sum()) if kept.numel() else 0
    available = n - taken
    if of_rest:
        rest = s[~kept].view(g, available)
        found = lof_outliers(rest, neighbours).tolist() if available else []
        counts = [int(taken * (int(c) / available)) for c in found]
    else:
        floor = s.amin(1, keepdim=True).expand(g, n)
        masked = torch.where(kept, floor, s)
        counts = [int(available * (int(c) / n)) for c in lof_outliers(masked, neighbours).tolist()]
    return max(0, min(max(counts, default=0), bound, available))
