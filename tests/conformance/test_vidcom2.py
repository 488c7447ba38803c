"""VidCom2 against its code, on tiny-qwen2.5-vl video.

Reference: xuyang-liu16/VidCom2 @ 944a17d14f4848ad080a65eab2b0711a760fa154,
token_compressor/vidcom2/vidcom2.py (`vidcom2_compression`, lines 15-36, and the helpers it
calls, lines 38-78) as token_compressor/vidcom2/models/qwen2_5_vl.py (`_compute_keep_indices`,
lines 20-33) runs it on a Qwen2.5-VL video's merged embeddings, transcribed below without
vtdsl: the half of the channels with the lowest variance over the video's tokens, each token
normalised over them; the multi-scale Gaussian similarity (a = 1/8 .. 2) to the video's mean
token and to its frame's; frame budgets round(0.25 (1 + p - mean p) · N) with p the softmax
of minus the frames' mean video similarity over 0.01; in each frame the tokens of lowest
video + frame similarity. policies/vidcom2.vt runs compiled on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from .conftest import IMPLS, video_kept
from .plain import jaccard, video_embeddings

CLAIMS = {"vidcom2": 0.91}  # the policy's `# conformance:` line (a Jaccard floor)
BASE = 0.25  # R_RATIO's default
POLICY = Path(__file__).resolve().parents[2] / "policies" / "vidcom2.vt"


def gaussian(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    dist_sq = ((x - centre) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))


def vidcom2_kept(embeds: torch.Tensor, per_frame: int, base: float = BASE) -> tuple[list[int], list[int]]:
    """The rows of `embeds` ``[F·N, d]`` VidCom2 keeps, ascending, and each frame's count."""
    variances = embeds.var(dim=0, unbiased=False)
    channels = torch.topk(variances, int(embeds.shape[-1] * 0.5), largest=False).indices
    frames = F.normalize(embeds[:, channels].view(-1, per_frame, channels.numel()), dim=-1)
    video_sim = gaussian(frames, frames.mean(dim=(0, 1), keepdim=True))
    frame_sim = gaussian(frames, frames.mean(dim=1, keepdim=True))
    weight = -video_sim.mean(dim=-1)
    probs = F.softmax((weight - weight.max()) / 0.01, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    counts = (scales * per_frame).round().long().clamp(min=1).tolist()
    fused = video_sim + frame_sim
    kept = []
    for f, count in enumerate(counts):
        kept += (torch.topk(fused[f], count, largest=False).indices + f * per_frame).tolist()
    return sorted(kept), counts


def quarter(tokens: int) -> int:
    return int(tokens * BASE + 0.5)  # vtdsl's 25%: rounded half up


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("groups, side, seeds", [(4, 16, (1, 2)), (6, 16, (1, 2)), (2, 20, (1, 2, 3))])
def test_vidcom2_keeps_what_its_code_keeps_where_the_frame_counts_add_up(qwen_video, attn, groups, side, seeds):
    """Clips whose softmax is not one-hot (frame budgets from 12 to 37 tokens of 64 or 100),
    on which VidCom2's rounded frame counts add up to 25% of the tokens."""
    vid, models, clip = qwen_video
    per_frame = (side // 2) ** 2
    for seed in seeds:
        inputs = clip(groups, side, seed)
        want, counts = vidcom2_kept(video_embeddings(models[attn], inputs), per_frame)
        assert sum(counts) == quarter(groups * per_frame) and len(set(counts)) > 1, counts
        assert video_kept(POLICY, models[attn], inputs, vid) == want, f"seed {seed}"


@pytest.mark.parametrize("attn", IMPLS)
def test_vidcom2_jaccard_where_its_frame_counts_miss_the_quarter(qwen_video, attn):
    """VidCom2 keeps what its roundings add up to (65 of 256, 97 of 384, 35 of 128); the file
    keeps 25%, taking the difference from the frames rounded up most."""
    vid, models, clip = qwen_video
    measured = []
    for groups, side, seed in [(4, 16, 3), (6, 16, 3), (8, 8, 1), (8, 8, 2), (8, 8, 3)]:
        inputs = clip(groups, side, seed)
        per_frame = (side // 2) ** 2
        want, counts = vidcom2_kept(video_embeddings(models[attn], inputs), per_frame)
        got = video_kept(POLICY, models[attn], inputs, vid)
        assert sum(counts) != quarter(groups * per_frame) and len(got) == quarter(groups * per_frame)
        measured.append(jaccard(want, got))
    assert min(measured) >= CLAIMS["vidcom2"], measured
