"""HiPrune's Qwen2.5-VL file against the authors' Qwen2.5-VL rule (documented
approximation: the counts and the buffers).

Reference: Danielement321/HiPrune @ 6e83a1240874e99a25df34f54221a29bb24b7bc2,
Qwen2_5_VL/qwen2_5_vl_HiPrune.py: the vision tower's forward (lines 518-581) keeps, per
block, the attention map (its flash path, the one bench_qwen.sh runs: a softmax over the
whole image, lines 169-210), mean over heads, summed over query rows, averaged over each
merge unit's 4 patches in the tower's window order and put back in raster order; the
selection (lines 1854-1890): N' = round(N * 0.223) of N merged tokens, round(N' * 0.1 / 5)
anchors by block OBJECT_LAYER - 1's score, anchors +-1 and +-width clamped to 0..N-1 and
de-duplicated, registers by the last block's score less 1 for the tokens already taken,
filling N'. bench_qwen.sh: retention 0.223, alpha 0.1, object layer 16 of the 7B's 32
blocks; on the 4-block tiny tower the file is rescaled (block 15 -> 2) and the reference
reads block 2 (object layer 3). The attention is recomputed here from each block's input
(q and k of its fused projection, the tower's rotary embedding), not read from vtdsl."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from . import plain
from .conftest import IMPLS, SEEDS

NAME, TINY = "hiprune-qwen2.5-vl", "tiny-qwen2.5-vl"
CLAIMS = {NAME: 0.90}  # measured; stated in policies/hiprune-qwen2.5-vl.vt
IMG, START, END = 250, 251, 252
SIDE = 48  # patches per side: 672 px, 576 merged tokens, the 7B's reference image


def case(seed: int) -> dict:
    g = torch.Generator().manual_seed(3000 + seed)
    ids = torch.tensor([[5, 6, 7, START] + [IMG] * (SIDE * SIDE // 4) + [END, 8, 9, 10]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.randn(SIDE * SIDE, 1176, generator=g),
                image_grid_thw=torch.tensor([[1, SIDE, SIDE]]), mm_token_type_ids=(ids == IMG).int())


def block_scores(model, inputs: dict) -> list[torch.Tensor]:
    """Each block's score per merged token (raster order), as HiPrune's tower computes it."""
    tower = model.model.visual
    seen = []
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0], kw["position_embeddings"])),
                                                with_kwargs=True) for blk in tower.blocks]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=tower.spatial_merge_size,
                                              window_size=tower.window_size, patch_size=tower.patch_size, kwargs={})
    reverse_indices = torch.argsort(window_index)
    scores = []
    for blk, (x, (cos, sin)) in zip(tower.blocks, seen):
        n = x.shape[0]
        q, k, _ = blk.attn.qkv(x).reshape(n, 3, blk.attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.permute(1, 0, 2), k.permute(1, 0, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        received = attn.mean(dim=0).sum(dim=0)
        scores.append(received.view(n // 4, -1).mean(dim=-1)[reverse_indices])
    return scores


def hiprune_keep(scores: list[torch.Tensor], width: int, retain: float = 0.223, alpha: float = 0.1,
                 object_layer: int = 3) -> tuple[list[int], list[int]]:
    """(kept merged tokens, anchors)."""
    shallow_attention, deep_attention = scores[object_layer - 1], scores[-1].clone()
    n = deep_attention.shape[0]
    visual_token_num = round(n * retain)
    shallow_token_num = round((visual_token_num * alpha) / 5)
    anchors = torch.topk(shallow_attention, k=shallow_token_num).indices
    shallow = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width])
    shallow = torch.unique(shallow.clamp(0, n - 1), sorted=False)
    taken = torch.zeros(n, dtype=torch.bool)
    taken.scatter_(0, shallow, 1)
    deep_attention -= taken.int()
    deep = torch.topk(deep_attention, k=visual_token_num - shallow.shape[0]).indices
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.cat([shallow, deep])] = True
    return keep.nonzero().flatten().tolist(), anchors.tolist()


@pytest.mark.slow  # three 672x672 images through the tower, twice
@pytest.mark.parametrize("attn", IMPLS)
def test_hiprune_keeps_nearly_what_hiprune_keeps_on_qwen25_vl(attn, qwen_models, qwen_compiled, once):
    models = qwen_models(TINY)
    jaccards = []
    for seed in SEEDS:
        inputs = case(seed)
        want, anchors = once((NAME, seed), lambda: hiprune_keep(block_scores(models["eager"], inputs), SIDE // 2))
        got = [v - 1 for v in qwen_compiled(NAME, models[attn], inputs, rescale_to=TINY)["vit.out#0"]]
        assert set(anchors) <= set(got), f"seed {seed}"  # the scores and anchors are exact
        assert len(got) == 128 and len(want) <= 128
        jaccards.append(plain.jaccard(got, want))
    assert min(jaccards) >= CLAIMS[NAME], jaccards
