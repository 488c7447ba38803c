"""Cosine similarity between token features (the only matmul of similarity selectors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalize", "pairwise_cosine"]


def normalize(x: Tensor) -> Tensor:
    """Unit-L2 rows in float32 (a zero row stays zero). No counted FLOPs."""
    return F.normalize(x.float(), dim=-1)


def pairwise_cosine(x: Tensor) -> Tensor:
    """All-pairs cosine similarity of the tokens of each sample.

    Parameters
    ----------
    x : Tensor
        ``[B, n, d]`` token features.

    Returns
    -------
    Tensor
        float32 ``[B, n, n]``, symmetric. One ``bmm``: ``2·n²·d`` FLOPs per image.
    """
    if x.dim() != 3:
        raise ValueError(f"pairwise_cosine expects [B, n, d], got shape {tuple(x.shape)}")
    xn = normalize(x)
    return torch.bmm(xn, xn.transpose(1, 2))
