"""`temporal`: how much a visual token changed since the previous frame, ``1 - cos(h, h')``
with h' the token at the same in-frame position one frame (temporal group) earlier; and
`uniqueness`, a frame-level score: ``1 - cos`` of the frame's mean token with the clip's
centre (the mean of the frames' means), given to every token of the frame.

It reads a layer's output hidden state (at `llm.layer0`, the LLM's input embeddings: the
merger's output, as vLLM's EVS compares them). Tokens of the first frame, and tokens whose
predecessor an earlier stage removed, have no predecessor and score 2, the maximum of
``1 - cos``: nothing they show was seen before (EVS keeps the first frame whole). The frame
and in-frame position of every row come from the input's token layout (`ScoreContext.frame`,
`frame_pos`), so the score applies to video inputs only; the IR refuses it where the input
is an image (`ModelSpec.frames_refusal`). No matmul: nothing counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ScoreContext, ScorerInfo, register

if TYPE_CHECKING:
    from torch import Tensor

# what a token without a predecessor scores: the largest value 1 - cos takes
UNSEEN = 2.0


def temporal_change(h: Tensor, frame: Tensor, frame_pos: Tensor) -> Tensor:
    """``[B, n]`` float32: ``1 - cos`` between each visual row of `h` ``[B, n, d]`` and the
    row holding the same in-frame position of the previous frame (`UNSEEN` without one);
    0 on text rows (`frame` < 0)."""
    import torch

    b, n, _ = h.shape
    visual = frame >= 0
    cells = int(frame_pos.max()) + 1 if bool(visual.any()) else 1
    frames = int(frame.max()) + 1 if bool(visual.any()) else 1
    # each (frame, position) slot -> the row holding it, -1 where no row does
    slot = torch.where(visual, frame * cells + frame_pos, frames * cells)
    row_of = torch.full((b, frames * cells + 1), -1, dtype=torch.long, device=h.device)
    row_of.scatter_(1, slot, torch.arange(n, device=h.device).expand(b, -1))
    row_of[:, -1] = -1  # the text rows' slot: no row is a predecessor there
    prev_slot = torch.where(visual & (frame > 0), slot - cells, frames * cells)
    prev = row_of.gather(1, prev_slot)
    has_prev = prev >= 0
    partner = h.gather(1, prev.clamp(min=0)[..., None].expand_as(h))
    cos = torch.nn.functional.cosine_similarity(h.float(), partner.float(), dim=-1)
    change = torch.where(has_prev, 1 - cos, torch.full_like(cos, UNSEEN))
    return torch.where(visual, change, torch.zeros_like(change))


def frame_uniqueness(h: Tensor, frame: Tensor) -> Tensor:
    """``[B, n]`` float32: for each visual row of `h` ``[B, n, d]``, 1 - cos of its
    frame's mean row with the mean of the frames' means (the frames present, each
    weighing one); 0 on text rows (`frame` < 0). VidCom2 (xuyang-liu16/VidCom2 @ 944a17d,
    token_compressor/vidcom2/vidcom2.py, compute_scales) gives a frame more budget the
    further it lies from the video's centre; it measures that with multi-scale Gaussian
    kernels on half the channels, this score with the cosine of the means."""
    import torch

    from ..frames import frame_means

    visual = frame >= 0
    frames = int(frame.max()) + 1 if bool(visual.any()) else 1
    means = frame_means(h, torch.where(visual, frame, torch.full_like(frame, frames)), frames + 1)[:, :frames]
    present = torch.zeros(h.shape[0], frames + 1, device=h.device).scatter_add_(
        1, torch.where(visual, frame, torch.full_like(frame, frames)), torch.ones_like(frame, dtype=torch.float32))
    present = (present[:, :frames] > 0).float()
    centre = (means * present[..., None]).sum(dim=1, keepdim=True) / present.sum(dim=1).clamp(min=1)[:, None, None]
    unique = 1 - torch.nn.functional.cosine_similarity(means, centre.expand_as(means), dim=-1)  # [B, F]
    per_row = unique.gather(1, frame.clamp(min=0))
    return torch.where(visual, per_row, torch.zeros_like(per_row))


def _uniqueness(ctx: ScoreContext) -> Tensor:
    if ctx.frame is None:
        raise ValueError("'uniqueness' needs the frames of the visual tokens (a video input)")
    return frame_uniqueness(ctx.captured["h"], ctx.frame)


def _temporal(ctx: ScoreContext) -> Tensor:
    if ctx.frame is None:
        raise ValueError("'temporal' needs the frames of the visual tokens (a video input)")
    return temporal_change(ctx.captured["h"], ctx.frame, ctx.frame_pos)


def _check(obs, spec) -> str | None:
    refusal = spec.frames_refusal()
    return None if refusal is None else f"'temporal' compares a token with the previous frame, but {refusal}"


def _check_unique(obs, spec) -> str | None:
    refusal = spec.frames_refusal()
    return None if refusal is None else f"'uniqueness' compares a frame with the clip's centre, but {refusal}"


register(ScorerInfo(
    "temporal", ("llm",), canonical="temporal", queries={(): "none"}, rank=47,
    projections=(), attention=False, rope=False, on_input=False, check=_check, kernel=_temporal,
    tower_error="'temporal' compares the LLM's visual tokens across frames, not at {where}",
    summary="1 - cosine of the token's hidden state with the same position in the previous frame "
            "(video; the first frame scores 2)",
))

register(ScorerInfo(
    "uniqueness", ("llm",), canonical="uniqueness", queries={(): "none"}, rank=48,
    projections=(), attention=False, rope=False, on_input=False, check=_check_unique, kernel=_uniqueness,
    tower_error="'uniqueness' compares the LLM's frames of a video, not at {where}",
    summary="frame-level: 1 - cosine of the token's frame's mean token with the clip's mean frame (video)",
))
