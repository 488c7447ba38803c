"""`gauss_video` and `gauss_frame`: how far a video token lies from the clip's centre and
from its frame's centre, by VidCom2's multi-scale Gaussian kernels (xuyang-liu16/VidCom2 @
944a17d, token_compressor/vidcom2/vidcom2.py, `select_low_var_channels`,
`compute_gaussian_scores`, `_multi_scale_gaussian`, lines 38-62).

Both read a layer's output hidden state (at `llm.layer0`, the merger's video embeddings,
which VidCom2 compresses) on the visual rows of the call: the half of the channels whose
variance over those rows is lowest, each row L2-normalised over them; the centre is the mean
of all visual rows (`gauss_video`) or of the row's frame (`gauss_frame`), and the kernel
sum ``Σ_a exp(-‖x - c‖² / 2a)`` over a = 1/8 .. 2 is negated, so the top tokens are the
farthest (VidCom2 keeps the k lowest `video + frame` sums). The frame and in-frame layout
come from `ScoreContext.frame`; video inputs only. Elementwise: nothing counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ScoreContext, ScorerInfo, register

if TYPE_CHECKING:
    from torch import Tensor

# VidCom2's kernel widths: 2**k for k in -3..1
ALPHAS = tuple(2.0 ** k for k in range(-3, 2))
CHANNEL_SHARE = 0.5  # select_low_var_channels' ratio


def _kernel_sum(x: Tensor, centre: Tensor) -> Tensor:
    dist_sq = ((x - centre) ** 2).sum(dim=-1)
    return sum((-dist_sq / (2 * a)).exp() for a in ALPHAS)


def gaussian_distance(h: Tensor, frame: Tensor, centre: str) -> Tensor:
    """``[B, n]`` float32: minus VidCom2's kernel sum of each visual row of `h` ``[B, n, d]``
    around the clip's (`centre` "video") or its frame's ("frame") mean; 0 on text rows."""
    import torch

    out = torch.zeros(h.shape[:2], dtype=torch.float32, device=h.device)
    for b in range(h.shape[0]):
        rows = (frame[b] >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        x = h[b, rows].float()
        channels = torch.topk(x.var(dim=0, unbiased=False), int(x.shape[-1] * CHANNEL_SHARE), largest=False).indices
        x = torch.nn.functional.normalize(x[:, channels], dim=-1)
        if centre == "video":
            c = x.mean(dim=0, keepdim=True)
        else:
            f = frame[b, rows]
            frames = int(f.max()) + 1
            total = torch.zeros(frames, x.shape[-1], device=x.device).index_add_(0, f, x)
            count = torch.zeros(frames, device=x.device).index_add_(0, f, torch.ones_like(f, dtype=torch.float32))
            c = (total / count.clamp(min=1)[:, None])[f]
        out[b, rows] = -_kernel_sum(x, c)
    return out


def _video(ctx: ScoreContext) -> Tensor:
    if ctx.frame is None:
        raise ValueError("'gauss_video' needs the frames of the visual tokens (a video input)")
    return gaussian_distance(ctx.captured["h"], ctx.frame, "video")


def _frame(ctx: ScoreContext) -> Tensor:
    if ctx.frame is None:
        raise ValueError("'gauss_frame' needs the frames of the visual tokens (a video input)")
    return gaussian_distance(ctx.captured["h"], ctx.frame, "frame")


def _checker(name: str):
    def check(obs, spec) -> str | None:
        refusal = spec.frames_refusal()
        return None if refusal is None else f"'{name}' compares a video's tokens with their centres, but {refusal}"

    return check


register(
    ScorerInfo(
        "gauss_video", ("llm",), canonical="gauss_video", queries={(): "none"}, rank=49,
        projections=(), attention=False, rope=False, on_input=False, check=_checker("gauss_video"), kernel=_video,
        tower_error="'gauss_video' compares the LLM's visual tokens of a video, not at {where}",
        summary="minus VidCom2's multi-scale Gaussian similarity of the token to the clip's mean token (video)",
    ),
    ScorerInfo(
        "gauss_frame", ("llm",), canonical="gauss_frame", queries={(): "none"}, rank=49,
        projections=(), attention=False, rope=False, on_input=False, check=_checker("gauss_frame"), kernel=_frame,
        tower_error="'gauss_frame' compares the LLM's visual tokens of a video, not at {where}",
        summary="minus VidCom2's multi-scale Gaussian similarity of the token to its frame's mean token (video)",
    ),
)
