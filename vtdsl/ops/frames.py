"""A video's frames as groups: windows and segments of consecutive frames, and DyCoke's
temporal token merging (TTM) inside them.

- `window_segments`: runs of N consecutive frames (`per window N`).
- `similar_segments`: FastVID's dynamic segmentation (DySeg; LunarShen/FastVID @ a40a109,
  fastvid_llavaonevision/.../language_model/modeling_qwen2.py, lines 912-922): the cosine of
  consecutive frames' global features; the clip is cut after the C - 1 frames whose
  similarity to the next is lowest, and after every frame whose similarity is below T.
  FastVID's global feature is SigLIP's attention-pooled frame embedding; a Qwen-VL tower
  has none, so here it is the mean of the frame's tokens entering the stage.
- `static_merge`: DyCoke's TTM (KD-TAO/DyCoke @ dd74634, llava/model/llava_arch.py,
  `dycole_ttm`, lines 35-93) generalised from its windows of 4 frames: in each window
  (segment) the first frame is kept whole, and every other frame at offset o is compared
  with its reference at offset ``o & (o - 1)`` (o with its lowest set bit cleared: DyCoke's
  pairs 1 -> 0, 3 -> 2, then 2 -> 0), token by token at the same in-frame position; its
  `merged` tokens most cosine-similar to the reference's are dropped, the reference's
  token standing for both. Similarities are taken on the input, never on merged frames.

All comparisons are elementwise (no matmul): nothing counted in the cost model.
"""

from __future__ import annotations

import torch
from torch import Tensor


def frame_means(x: Tensor, frame: Tensor, frames: int) -> Tensor:
    """``[G, F, d]`` float32: the mean of each frame's rows of `x` ``[G, n, d]``."""
    g, _, d = x.shape
    ids = frame.clamp(min=0)[..., None].expand(-1, -1, d)
    total = torch.zeros(g, frames, d, dtype=torch.float32, device=x.device).scatter_add_(1, ids, x.float())
    count = torch.zeros(g, frames, dtype=torch.float32, device=x.device).scatter_add_(
        1, frame.clamp(min=0), torch.ones_like(frame, dtype=torch.float32))
    return total / count.clamp(min=1)[..., None]


def window_segments(g: int, frames: int, window: int, device=None) -> Tensor:
    """``[G, F]`` int64: each frame's window, runs of `window` consecutive frames."""
    return (torch.arange(frames, device=device) // window)[None].expand(g, -1)


def similar_segments(x: Tensor, frame: Tensor, frames: int, count: int, below: float | None = None) -> Tensor:
    """``[G, F]`` int64: each frame's segment under FastVID's DySeg rule on the frames'
    mean tokens: cuts after the ``count - 1`` least similar consecutive pairs, and after
    every pair whose cosine is below `below`."""
    g = x.shape[0]
    if frames < 2:
        return torch.zeros(g, frames, dtype=torch.long, device=x.device)
    means = torch.nn.functional.normalize(frame_means(x, frame, frames), dim=-1)
    sim = (means[:, :-1] * means[:, 1:]).sum(dim=-1)  # [G, F - 1]
    cut = torch.zeros_like(sim, dtype=torch.bool)
    lowest = min(count - 1, frames - 1)
    if lowest > 0:
        cut.scatter_(1, torch.topk(sim, lowest, dim=1, largest=False).indices, True)
    if below is not None:
        cut |= sim < below
    seg = torch.cumsum(cut.long(), dim=1)
    return torch.cat([torch.zeros(g, 1, dtype=torch.long, device=x.device), seg], dim=1)


def reference_frames(segments: Tensor) -> Tensor:
    """``[G, F]`` int64: the frame each frame is compared with (-1 for a segment's first):
    at offset o from its segment's start, the frame at offset ``o & (o - 1)``."""
    g, frames = segments.shape
    idx = torch.arange(frames, device=segments.device).expand(g, -1)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start = torch.cummax(torch.where(new, idx, torch.zeros_like(idx)), dim=1).values
    offset = idx - start
    return torch.where(offset > 0, start + (offset & (offset - 1)), torch.full_like(idx, -1))


def static_merge(x: Tensor, frame: Tensor, pos: Tensor, segments: Tensor, merged: int) -> Tensor:
    """``[G, k]`` int64, ascending: the rows `static_merge` keeps of a whole video.

    `x` ``[G, n, d]`` holds every frame's tokens, `frame` / `pos` ``[G, n]`` each row's
    frame and in-frame position, `segments` ``[G, F]`` each frame's window or segment.
    Every frame with a reference (`reference_frames`) drops the `merged` rows whose
    cosine with the reference's row at the same position is highest (ties: lower index);
    every row of a segment's first frame stays. All samples have the same segment count
    (the caller's plan), so k is one number."""
    g, n, _ = x.shape
    frames = segments.shape[1]
    cells = int(pos.max()) + 1
    ref = reference_frames(segments).gather(1, frame)  # [G, n]
    row_of = torch.full((g, frames * cells), -1, dtype=torch.long, device=x.device)
    row_of.scatter_(1, frame * cells + pos, torch.arange(n, device=x.device).expand(g, -1))
    partner = row_of.gather(1, (ref.clamp(min=0) * cells + pos))
    has_ref = (ref >= 0) & (partner >= 0)
    other = x.gather(1, partner.clamp(min=0)[..., None].expand_as(x))
    sim = torch.nn.functional.cosine_similarity(x.float(), other.float(), dim=-1)
    keep = torch.ones(g, n, dtype=torch.bool, device=x.device)
    if merged > 0:
        # rank inside each frame: the `merged` most similar rows of a referenced frame go
        key = torch.where(has_ref, sim, torch.full_like(sim, -float("inf")))
        order = torch.sort(-key, dim=1, stable=True).indices
        frame_sorted = frame.gather(1, order)
        rank = torch.zeros_like(order)
        for f in range(frames):
            in_f = frame_sorted == f
            rank = torch.where(in_f, torch.cumsum(in_f.long(), dim=1) - 1, rank)
        gone_sorted = (rank < merged) & has_ref.gather(1, order)
        keep.scatter_(1, order, ~gone_sorted)
    counts = keep.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError("static_merge: samples keep different counts (their segment counts differ)")
    return keep.nonzero()[:, 1].view(g, int(counts[0]))
