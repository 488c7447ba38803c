"""DyCoke's temporal token merging (TTM) against its code, on tiny-qwen2.5-vl video.

Reference: KD-TAO/DyCoke @ dd7463498203479d0ff6f2d29c4e72928c0af244,
llava/model/llava_arch.py, `dycole_ttm` (lines 35-93), transcribed below without vtdsl as
the set of rows it keeps: stage 1, each pair (2i, 2i+1) keeps frame 2i whole and the
int((1 - K)·N) tokens of frame 2i+1 least cosine-similar (of normalised tokens) to frame 2i
at the same position; stage 2, for i = 0, 4, ... < F - 4, frame i+2 keeps its int((1 - K)·N)
tokens least similar to frame i (frames from the unmerged input). As in the authors'
Qwen2.5-VL port (mvish7/dycoke_token_compression @ 7d164a0), a frame is one temporal group
of the merger's video embeddings. policies/dycoke.vt runs compiled on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import video_kept
from .plain import video_embeddings

CLAIMS = {"dycoke": 1.0}  # the policy's `# conformance:` line (1.0: equal kept sets)
K = 0.7  # dycoke_k, the README's setting
POLICY = Path(__file__).resolve().parents[2] / "policies" / "dycoke.vt"


def dycoke_kept(embeds: torch.Tensor, per_frame: int, k: float = K) -> list[int]:
    """The rows of `embeds` ``[F·N, d]`` that dycole_ttm's output is made of, ascending."""
    frames = embeds.shape[0] // per_frame
    keep_share = 1 - k
    count = int(keep_share * per_frame)

    def frame(i):
        return embeds[i * per_frame:(i + 1) * per_frame]

    def least_similar(a, b, normalise):
        if normalise:
            a, b = torch.nn.functional.normalize(a, p=2, dim=1), torch.nn.functional.normalize(b, p=2, dim=1)
        sim = torch.nn.functional.cosine_similarity(a, b, dim=1)
        return set(sim.topk(count, largest=False).indices.tolist())

    kept: dict[int, set[int]] = {}
    for i in range(0, frames - 1, 2):
        kept[i] = set(range(per_frame))
        kept[i + 1] = least_similar(frame(i), frame(i + 1), True)
    for i in range(0, frames - 4, 4):
        kept[i] = set(range(per_frame))
        kept[i + 2] = least_similar(frame(i), frame(i + 2), False)
    return sorted(f * per_frame + c for f, cells in kept.items() for c in cells)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("groups, side", [(6, 16), (2, 20)])
def test_ttm_keeps_what_dycole_ttm_keeps(qwen_video, attn, groups, side):
    """F ≡ 2 (mod 4) and N with frac(0.3·N) < 0.5 (64: 19.2, 100: 30): the file's exact case."""
    vid, models, clip = qwen_video
    model = models[attn]
    per_frame = (side // 2) ** 2
    for seed in (1, 2, 3):
        inputs = clip(groups, side, seed)
        want = dycoke_kept(video_embeddings(model, inputs), per_frame)
        assert video_kept(POLICY, model, inputs, vid) == want, f"seed {seed}"
        windows = -(-groups // 4)
        assert len(want) == windows * per_frame + (groups - windows) * int((1 - K) * per_frame)


def test_ttm_differs_only_where_dycokes_loop_stops_early(qwen_video):
    """8 groups: DyCoke's stage 2 runs for i = 0 only (range(0, 4, 4)), so frame 6 stays whole;
    vtdsl merges it against frame 4 as in the first window: its 45 most similar tokens go."""
    vid, models, clip = qwen_video
    model, per_frame = models["eager"], 64
    inputs = clip(8, 16, 4)
    embeds = video_embeddings(model, inputs)
    want, got = set(dycoke_kept(embeds, per_frame)), set(video_kept(POLICY, model, inputs, vid))
    assert got < want
    extra = sorted(want - got)
    assert all(6 * per_frame <= r < 7 * per_frame for r in extra) and len(extra) == per_frame - 19
    sim = torch.nn.functional.cosine_similarity(embeds[6 * per_frame:7 * per_frame], embeds[4 * per_frame:5 * per_frame])
    assert set(r - 6 * per_frame for r in extra) == set(sim.topk(len(extra)).indices.tolist())
