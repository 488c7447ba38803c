"""vLLM's EVS (Efficient Video Sampling) against its code, on tiny-qwen2.5-vl video.

Reference: vllm-project/vllm @ 094f117823287790739d3022162a3f30f13d758b,
vllm/multimodal/evs.py: compute_retained_tokens_count (lines 17-36) and
compute_retention_mask (lines 39-93), transcribed below without vtdsl: the merged video
embeddings as (T, h, w, d), 1 - cosine with the previous temporal group, the first group
scored 255, a stable descending argsort, the first max(h·w, int(N·(1 - q))) kept. It runs
on the plain model's video embeddings (what vLLM prunes before the LLM); policies/evs.vt
(q = 0.75) runs compiled on the same weights."""

from __future__ import annotations

import pytest
import torch

CLAIMS = {"evs": 1.0}  # the policy's `# conformance:` line (1.0: equal kept sets)
Q = 0.75  # policies/evs.vt's rate


def retained_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))


def evs_mask(video_embeds: torch.Tensor, thw: tuple[int, int, int], merge: int, q: float) -> torch.Tensor:
    t, h, w = thw
    grid = video_embeds.reshape(t, h // merge, w // merge, video_embeds.shape[-1])
    change = 1 - torch.nn.functional.cosine_similarity(grid[1:], grid[:-1], dim=-1)
    change = torch.cat([torch.full_like(grid[:1, :, :, 0], 255.0), change], dim=0).reshape(-1)
    order = torch.argsort(change, descending=True, stable=True)
    mask = torch.zeros_like(change, dtype=torch.bool)
    mask[order[:retained_count((h // merge) * (w // merge), t, q)]] = True
    return mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("groups, side", [(4, 8), (6, 12)])
def test_evs_keeps_what_compute_retention_mask_keeps(qwen_video, attn, groups, side):
    from pathlib import Path

    import vtdsl.compiler as vc

    vid, models, clip = qwen_video
    model = models[attn]
    policy = Path(__file__).resolve().parents[2] / "policies" / "evs.vt"
    for seed in (1, 2, 3):
        inputs = clip(groups, side, seed)
        with torch.no_grad():
            embeds = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        want = evs_mask(embeds.pooler_output[0], (groups, side, side), 2, Q).nonzero().flatten().tolist()
        with vc.apply(policy, model), torch.no_grad():
            model(**inputs)
            kept = vc.kept_tokens(model)["llm.layer0#0"][0]
        first = int((inputs["input_ids"][0] == vid).nonzero()[0])
        assert [p - first for p in kept.tolist()] == want, f"seed {seed}"
        assert len(want) == groups * (side // 2) ** 2 // 4
