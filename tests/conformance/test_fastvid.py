"""FastVID against its code, on tiny-qwen2.5-vl video (an approximation: the Jaccard floor).

Reference: LunarShen/FastVID @ a40a109c, fastvid_qwen25vl/lmms-eval/lmms_eval/models/
qwenvlutils/modeling_qwen2_5_vl.py, transcribed below without vtdsl: the salient score of
the last vision block (`Qwen2_5_VLVisionFlashAttention2.forward`, lines 192-203: per
temporal group, the mean of its patches' rotary queries against the mean of each merge
unit's 4 rotary keys, softmax, mean over heads; `Qwen2_5_VisionTransformerPretrainedModel.
forward`, lines 584-596, puts it back in raster order) and the pruning of
`Qwen2_5_VLForConditionalGeneration.forward` (lines 1887-2017): DySeg on the frames' mean
merged tokens (c = 8, tau = 0.84), in each segment int(0.27·N)·len tokens, 40% of them
context; frames of a segment whose mean token is >= 0.95 cosine-similar to the next give
their share to the next (only each run's last frame keeps tokens); salient tokens by the
score, context tokens by DPC-kNN density peaks (k = 4) among the rest of a frame, on every
4th kept frame from the segment's end (DTM p = 4; the context tokens then absorb the
segment's other tokens, which moves no kept index). The settings are the script's
(fastvid_qwen25vl/scripts/eval.sh). DPC's 1e-6 random tie noise is left out.
policies/fastvid.vt runs compiled on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .conftest import IMPLS, video_kept
from .plain import jaccard, video_embeddings

CLAIMS = {"fastvid": 0.20}  # the policy's `# conformance:` line (a Jaccard floor)
RATIO, SEGMENTS, TAU, IGNORE, CONTEXT, DTM_P = 0.27, 8, 0.84, 0.95, 0.4, 4
POLICY = Path(__file__).resolve().parents[2] / "policies" / "fastvid.vt"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def salient_scores(model, inputs) -> torch.Tensor:
    """``[T, N]``: the last vision block's frame-mean query attention to each merge unit."""
    from transformers.vision_utils import get_vision_window_index

    visual, grab = model.model.visual, {}
    attn = visual.blocks[-1].attn
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: grab.update(h=args[0], pe=kwargs["position_embeddings"]), with_kwargs=True)
    try:
        video_embeddings(model, inputs)
    finally:
        hook.remove()
    t, gh, gw = inputs["video_grid_thw"][0].tolist()
    seq, heads = grab["h"].shape[0], attn.num_heads
    with torch.no_grad():
        q, k, _ = attn.qkv(grab["h"]).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = (e.unsqueeze(-2).float() for e in grab["pe"])
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, seq, hd]
    dh = q.shape[-1]
    q_mean = q.reshape(heads, t, gh * gw, dh).mean(-2, keepdim=True)
    k_unit = k.reshape(heads, t, gh * gw // 4, 4, dh).mean(-2)
    weights = torch.softmax(q_mean @ k_unit.transpose(-2, -1) / dh ** 0.5, dim=-1).mean(2).mean(0)
    window_index, _ = get_vision_window_index(inputs["video_grid_thw"], visual.spatial_merge_size,
                                              visual.window_size, visual.patch_size)
    return weights.reshape(-1)[torch.argsort(window_index)].reshape(t, -1)


def _runs(cuts: torch.Tensor, length: int) -> list[int]:
    """Sizes of the runs a sorted tensor of cut positions (after frame i) makes of `length`."""
    if cuts.numel() == 0:
        return [length]
    sizes = [int(cuts[0]) + 1] + [int(cuts[i] - cuts[i - 1]) for i in range(1, cuts.numel())]
    return sizes + [length - int(cuts[-1]) - 1]


def _even(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def frame_counts(glob: torch.Tensor, seg_len: int, per_frame: int) -> tuple[list[int], list[int]]:
    """Salient and context counts of each frame of one segment (lines 1927-1988)."""
    retain = int(per_frame * RATIO) * seg_len
    context = max(int(retain * CONTEXT), 1)
    salient = retain - context
    if seg_len == 1:
        return [salient], [context]
    sim = (glob[:-1] * glob[1:]).sum(dim=1)
    runs = _runs(torch.nonzero(sim < IGNORE).squeeze(1).sort().values, seg_len)
    run_salient = _even(salient, len(runs))
    pots = _even(context, (len(runs) + DTM_P - 1) // DTM_P)
    run_context = [min(pots[i // DTM_P], per_frame // 2) if i % DTM_P == 0 else 0 for i in range(len(runs))]
    run_context.reverse()
    sal, ctx = [], []
    for size, s, c in zip(runs, run_salient, run_context):
        sal += [0] * (size - 1)
        ctx += [0] * (size - 1)
        ctx.append(min(c, per_frame // 2) if c > 0 else 0)
        sal.append(min(s, per_frame - ctx[-1]))
    return sal, ctx


def density_peaks(x: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` rows of `x` ``[m, d]`` with the highest DPC-kNN score (k = 4), ascending."""
    dist = torch.cdist(x[None].float(), x[None].float())[0] / x.shape[-1] ** 0.5
    near = torch.topk(dist, k=min(4, x.shape[0]), dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp()
    denser = (density[None, :] > density[:, None]).float()
    parent = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values
    return torch.topk(parent * density, count).indices.sort().values


def fastvid_kept(model, inputs) -> list[int]:
    """The video rows FastVID keeps, ascending (merged or not: the kept indices)."""
    t = int(inputs["video_grid_thw"][0, 0])
    embeds = video_embeddings(model, inputs)
    per_frame = embeds.shape[0] // t
    scores = salient_scores(model, inputs)
    glob = embeds.reshape(t, per_frame, -1).mean(1)
    glob = glob / glob.norm(dim=1, keepdim=True)
    sim = (glob[:-1] * glob[1:]).sum(dim=1)
    cuts = torch.unique(torch.cat([torch.topk(sim, SEGMENTS - 1, largest=False).indices,
                                   torch.nonzero(sim < TAU).squeeze(1)])).sort().values
    kept, start = [], 0
    for size in _runs(cuts, t):
        sal, ctx = frame_counts(glob[start:start + size], size, per_frame)
        for i, frame in enumerate(range(start, start + size)):
            top = torch.topk(scores[frame], sal[i]).indices if sal[i] > 0 else torch.zeros(0, dtype=torch.long)
            kept += (top + frame * per_frame).tolist()
            if ctx[i] > 0:
                rest = torch.tensor([j for j in range(per_frame) if j not in set(top.tolist())])
                peaks = rest[density_peaks(embeds[frame * per_frame + rest], ctx[i])]
                kept += (peaks + frame * per_frame).tolist()
        start += size
    return sorted(kept)


def still_clip(clip, seed: int) -> dict:
    """12 groups of 64 tokens whose groups 5-7 repeat group 4: DySeg's 7 cuts miss the three
    equal pairs, so frames 4-7 are one segment and one run of frames >= 0.95 similar."""
    inputs = clip(12, 16, seed)
    px = inputs["pixel_values_videos"].view(12, 256, -1).clone()
    px[5:8] = px[4]
    return dict(inputs, pixel_values_videos=px.reshape(12 * 256, -1))


@pytest.mark.parametrize("attn", IMPLS)
def test_fastvid_jaccard_with_its_code(qwen_models, qwen_video, attn):
    """The file's norm proxy for the ViT score and k-center for the density peaks overlap
    FastVID's kept set by about a quarter (two random 27% subsets: 0.156); on a still run
    FastVID moves the run's budget to its last frame, where vtdsl keeps 27% of every frame."""
    model, (vid, _, clip) = qwen_models("tiny-qwen2.5-vl")[attn], qwen_video
    measured = []
    for groups, seed in [(8, 1), (8, 2), (10, 1), (10, 2), ("still", 1), ("still", 2)]:
        inputs = still_clip(clip, seed) if groups == "still" else clip(groups, 16, seed)
        want, got = fastvid_kept(model, inputs), video_kept(POLICY, model, inputs, vid)
        if groups == "still":
            # 4 frames x int(0.27 x 64) = 68, 27 of them context: the run's last frame keeps
            # min(27, 32) context and min(41, 64 - 27) salient tokens, its three others none
            assert [sum(1 for r in want if r // 64 == f) for f in range(4, 8)] == [0, 0, 0, 64]
        else:
            assert abs(len(got) - len(want)) <= 3
        measured.append(jaccard(want, got))
    assert min(measured) >= CLAIMS["fastvid"], measured
