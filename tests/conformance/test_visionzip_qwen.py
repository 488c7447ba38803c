"""VisionZip's Qwen2.5-VL file against the authors' Qwen2.5-VL rule.

Reference: dvlab-research/VisionZip @ 68993a31d4f704498a0cc1f0f026754467be65e2 ("Release
code for Qwen2.5VL", Senqiao Yang; the README at 769aa61b links this commit), read in the
fork jsilvcast/VisionZip, which carries the authors' commits unchanged:
Qwen2_5_VL/qwen2_5vl_visionzip.py lines 263-303 (eager vision attention: the block's
softmax under its cu_seqlens mask, returned with the rotated keys), 590-613 (only the last
block returns them; the score per merged token: head mean, summed over the query rows,
averaged over the unit's 4 patches in window order, put back in raster order; the keys:
mean over the unit's patches, raster order, then over heads) and 1915-1966 (dominant =
top int(0.65 N) as released, int(0.45 N) in the README's 50% setting (Qwen2_5_VL/README.md
@ 769aa61b); contextual = max(int(0.05 N), 1) targets at stride max(1, R // C) among
the R other tokens in raster order, each other token joins its most cosine-similar target
by keys, a contextual token is target + mean(joined), put at its target's row; the rows
kept, positions and attention mask sliced alike). The scores and the merged tokens are
recomputed here from the plain model's last block input and visual output, not read from
vtdsl. Image sizes: 20x20 and 16x20 patches (100 and 80 merged tokens), sizes at which the
files' half-up percentages equal VisionZip's truncated counts (65 + 5 and 52 + 4 at 65%,
45 + 5 and 36 + 4 at 45%)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from .conftest import IMPLS, SEEDS, qwen_image_case

TINY = "tiny-qwen2.5-vl"
DOMINANT = {"visionzip-qwen2.5-vl": 0.65, "visionzip-qwen2.5-vl-50": 0.45}  # dominant_num's ratio
CLAIMS = dict.fromkeys(DOMINANT, 1.0)  # the policies' `# conformance:` lines (1.0: equal kept sets)
IMG = 250  # tiny-qwen2.5-vl's <|image_pad|>
SIZES = ((20, 20), (16, 20))


def case(seed: int, rows: int, cols: int) -> dict:
    return qwen_image_case(4000 + seed, rows, cols, 4 + seed)


def last_block_score_and_keys(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score [N], keys [N, head_dim], merged tokens [N, h]) in raster order, as VisionZip's
    tower returns them."""
    tower = model.model.visual
    seen = {}
    hook = tower.blocks[-1].attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=a[0], cu=kw["cu_seqlens"], rope=kw["position_embeddings"]), with_kwargs=True)
    try:
        with torch.no_grad():
            merged = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                    image_grid_thw=inputs["image_grid_thw"]).pooler_output
    finally:
        hook.remove()
    merged = torch.cat(list(merged)) if isinstance(merged, (list, tuple)) else merged
    attn, x, cu = tower.blocks[-1].attn, seen["x"], seen["cu"].tolist()
    n = x.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *seen["rope"])
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, T, D]
        mask = torch.full((n, n), torch.finfo(q.dtype).min)
        for a, b in zip(cu[:-1], cu[1:]):
            mask[a:b, a:b] = 0
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + mask, dim=-1, dtype=torch.float32)
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=tower.spatial_merge_size,
                                              window_size=tower.window_size, patch_size=tower.patch_size, kwargs={})
    reverse_indices = torch.argsort(window_index)
    score = weights.mean(dim=0).sum(dim=0).view(n // 4, -1).mean(dim=-1)[reverse_indices]
    keys = k.reshape(k.shape[0], n // 4, 4, k.shape[-1]).mean(dim=2)[:, reverse_indices].mean(dim=0)
    return score, keys, merged


def visionzip_select(score, keys, merged, dominant_ratio: float = 0.65, contextual_ratio: float = 0.05):
    """(kept merged-token indices ascending, the image rows [len(kept), h] in that order)."""
    n = score.shape[0]
    dominant_num = int(dominant_ratio * n)
    contextual_num = max(int(contextual_ratio * n), 1)
    dominant = torch.zeros(n, dtype=torch.bool)
    dominant[torch.topk(score, dominant_num).indices] = True
    rest = (~dominant).nonzero().flatten()
    metric = keys[rest] / keys[rest].norm(dim=-1, keepdim=True)
    step = max(1, rest.shape[0] // contextual_num)
    targets = torch.arange(0, rest.shape[0], step)[:contextual_num]
    joiners = ~torch.isin(torch.arange(rest.shape[0]), targets)
    choice = (metric[joiners] @ metric[targets].T).argmax(dim=1)
    assign = F.one_hot(choice, contextual_num).to(merged.dtype)
    counts = assign.sum(dim=0).clamp(min=1)[:, None]
    rows = merged.clone()
    rows[rest[targets]] = merged[rest[targets]] + (assign.T @ merged[rest[joiners]]) / counts
    kept = dominant.clone()
    kept[rest[targets]] = True
    index = kept.nonzero().flatten()
    return index.tolist(), rows[index]


def visionzip_logits(model, inputs: dict, dominant_ratio: float) -> tuple[list[int], torch.Tensor]:
    """VisionZip's kept merged tokens and the last position's logits of the LLM run on
    the prompt cut to them (their rows and M-RoPE positions kept)."""
    kept, rows = visionzip_select(*last_block_score_and_keys(model, inputs), dominant_ratio)
    ids = inputs["input_ids"]
    image_rows = (ids[0] == IMG).nonzero().flatten()
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[image_rows] = False
    keep[image_rows[kept]] = True
    inner = model.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(ids)
        embeds[0, image_rows[kept]] = rows
        positions, _ = inner.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])
        hidden = inner.language_model(inputs_embeds=embeds[:, keep], position_ids=positions[:, :, keep],
                                      attention_mask=inputs["attention_mask"][:, keep]).last_hidden_state
        return kept, model.lm_head(hidden[:, -1])[0]


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=[f"{r}x{c}" for r, c in SIZES])
@pytest.mark.parametrize("name", DOMINANT)
def test_visionzip_keeps_and_merges_what_visionzip_does_on_qwen25_vl(name, size, attn, qwen_models, qwen_compiled,
                                                                      once):
    models = qwen_models(TINY)
    n, ratio = size[0] * size[1] // 4, DOMINANT[name]
    for seed in SEEDS:
        inputs = case(seed, *size)
        want, logits = once((name, size, seed), lambda: visionzip_logits(models["eager"], inputs, ratio))
        got, got_logits = qwen_compiled(name, models[attn], inputs, rescale_to=TINY, logits=True)
        assert len(want) == int(ratio * n) + max(int(0.05 * n), 1), f"seed {seed}"
        assert [v - 1 for v in got["vit.out#0"]] == want, f"seed {seed}"
        torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=1e-4)
