"""FrameFusion against its code, on tiny-qwen2.5-vl video.

Reference: thu-nics/FrameFusion @ 275c7e70c16f6839295c1f01763b26a63c31d2d9,
framefusion/main.py (`FrameFusion.forward`, `_compute_pruning_ratio`,
`compute_similarity_and_token_index_by_patch`) with its hook points in
framefusion/models/qwen2/modeling_qwen2_vl.py @ 561e156 and the last-4-rows attention of
framefusion/utils.py @ 5b44b96, transcribed below without vtdsl at its defaults (cost 0.3,
similarity_lower_bound 0.6, ratio_lower_bound 0.1, 28 layers): before layer 0, the share of
visual tokens at least 0.6 cosine-similar to the same patch one temporal group earlier; on
the clips here none is, so merging stops at once with sparsity list [0], and after layer 0's
attention the round(V·(1 − p)) visual tokens with the most attention (mean over heads and
the prompt's last 4 query rows) stay. policies/framefusion.vt runs compiled on the same
weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CLAIMS = {"framefusion": 1.0}  # the policy's `# conformance:` line (1.0: equal kept sets)
COST, SIM_BOUND, LAYERS = 0.3, 0.6, 28  # FrameFusion.__init__ defaults; num_layers default
POLICY = Path(__file__).resolve().parents[2] / "policies" / "framefusion.vt"


def pruning_ratio(sparsities: list[float], cost: float = COST, layers: int = LAYERS) -> float:
    """The share of the remaining visual tokens the next layer must drop to meet `cost`."""
    kept, spent = 1.0, 0.0
    for s in sparsities:
        kept *= 1 - s
        spent += kept
    left = layers * cost - spent
    share = left / ((layers - len(sparsities)) * kept)
    return 0.0 if share > 1 else 1 - share


def merge_share(embeds: torch.Tensor, groups: int) -> float:
    """The share of visual tokens at least SIM_BOUND-similar to their previous-group twin."""
    grid = embeds.view(groups, -1, embeds.shape[-1])
    dot = (grid[1:] * grid[:-1]).sum(-1)
    cos = dot / (grid[1:].norm(dim=-1) * grid[:-1].norm(dim=-1))
    return int((cos >= SIM_BOUND).sum()) / embeds.shape[0]


def framefusion_kept(model, inputs, first: int, visual: int, groups: int) -> list[int]:
    """The visual rows (0-based in the video) FrameFusion keeps, for a clip with no merge."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    share = merge_share(out.hidden_states[0][0, first:first + visual], groups)
    assert share == 0.0, "the transcription covers clips where FrameFusion merges nothing"
    p = pruning_ratio([share])  # merging stops: the share is under ratio_lower_bound
    attention = out.attentions[0][0, :, -4:, :].mean(dim=(0, 1))[first:first + visual]
    return sorted(attention.topk(round(visual * (1 - p))).indices.tolist())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("groups, side, seeds", [(6, 16, (1, 2, 4)), (4, 8, (1, 2, 3)), (2, 20, (1, 2, 3))])
def test_framefusion_keeps_what_its_forward_keeps(qwen_video, attn, groups, side, seeds):
    """The seeds whose clips have no pair at cosine 0.6 (seed 3 at 6 groups of 16 has one)."""
    import vtdsl.compiler as vc

    vid, models, clip = qwen_video
    visual = groups * (side // 2) ** 2
    for seed in seeds:
        inputs = clip(groups, side, seed)
        first = int((inputs["input_ids"][0] == vid).nonzero()[0])
        want = framefusion_kept(models["eager"], inputs, first, visual, groups)
        with vc.apply(POLICY, models[attn]), torch.no_grad():
            models[attn](**inputs)
            kept = vc.kept_tokens(models[attn])["llm.layer1#0"][0]
        assert [p - first for p in kept.tolist()] == want, f"seed {seed}"
        assert CLAIMS["framefusion"] == 1.0 and len(want) == round(visual * 7.4 / 27)


def test_pruning_ratio_matches_the_cost_bound():
    """With no merge, layers 1..27 see 1 − p of the tokens and layer 0 all: 30% of 28."""
    p = pruning_ratio([0.0])
    assert abs(1 + 27 * (1 - p) - COST * LAYERS) < 1e-12
    assert pruning_ratio([]) == pytest.approx(1 - COST)


MERGE_FLOOR = 0.97  # measured: 1.0, 1.0, 0.9811, 0.9718 on the clips below


def merge_runs(frames: torch.Tensor, merged: torch.Tensor) -> None:
    """FrameFusion's merge in place: each run of merged tokens at a patch, with the token
    before it, becomes their mean in that token (frames ``[T, N, d]``, merged ``[T, N]``)."""
    for cell in range(frames.shape[1]):
        t = 1
        while t < frames.shape[0]:
            end = t
            while end < frames.shape[0] and merged[end, cell]:
                end += 1
            if end > t:
                frames[t - 1, cell] = frames[t - 1:end, cell].mean(0)
            t = end + 1 if end > t else t + 1


def framefusion_kept_merging(model, inputs, first: int, groups: int) -> set[int]:
    """FrameFusion on a clip where under 10% merge: merge before layer 0 (merged rows leave,
    the rest keep their M-RoPE ids), stop merging, prune after layer 0 with p([share])."""
    visual = int((inputs["input_ids"][0] == inputs["input_ids"][0, first]).sum())
    seen: dict = {}

    def merge(_module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        frames = embeds[0, first:first + visual].view(groups, visual // groups, -1)
        merged = torch.zeros(frames.shape[:2], dtype=torch.bool)
        dot = (frames[1:] * frames[:-1]).sum(-1)
        merged[1:] = dot / (frames[1:].norm(dim=-1) * frames[:-1].norm(dim=-1)) >= SIM_BOUND
        merge_runs(frames, merged)
        embeds[0, first:first + visual] = frames.reshape(visual, -1)
        keep = torch.ones(embeds.shape[1], dtype=torch.bool)
        keep[first:first + visual] = ~merged.view(-1)
        seen.update(keep=keep, share=int(merged.sum()) / visual)
        kwargs.update(inputs_embeds=embeds[:, keep], position_ids=kwargs["position_ids"][..., keep],
                      attention_mask=kwargs["attention_mask"][:, keep])
        return args, kwargs

    handle = model.model.language_model.register_forward_pre_hook(merge, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    assert 0 < seen["share"] < 0.1, "a clip where FrameFusion merges, then prunes after layer 0"
    left = seen["keep"].nonzero().flatten()[first:first + visual - round(seen["share"] * visual)]
    attention = out.attentions[0][0, :, -4:, :].mean(dim=(0, 1))[first:first + len(left)]
    count = round(len(left) * (1 - pruning_ratio([seen["share"]])))
    return set((left[attention.topk(count).indices] - first).tolist())


@pytest.mark.parametrize("groups, side, seed", [(6, 16, 3), (2, 20, 7), (6, 16, 6), (4, 16, 6)])
def test_where_framefusion_merges_a_few_the_kept_sets_stay_close(qwen_video, groups, side, seed):
    """The approximated branch: clips with 1 pair at cosine >= 0.6. FrameFusion merges it
    away and ranks merged states; the file ranks the unmerged ones."""
    import vtdsl.compiler as vc

    vid, models, clip = qwen_video
    inputs = clip(groups, side, seed)
    first = int((inputs["input_ids"][0] == vid).nonzero()[0])
    want = framefusion_kept_merging(models["eager"], inputs, first, groups)
    with vc.apply(POLICY, models["eager"]), torch.no_grad():
        models["eager"](**inputs)
        got = set((vc.kept_tokens(models["eager"])["llm.layer1#0"][0] - first).tolist())
    assert len(want & got) / len(want | got) >= MERGE_FLOOR
