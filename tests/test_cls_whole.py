"""`cls(whole)`: the CLS row of a ViT layer's q and k taken as one head of the full width
(scale 1/sqrt(width)), as PruMerge (42Shawn/LLaVA-PruMerge, clip_encoder.py
token_prune_merge_advanced) and Recoverable Compression (banjiuyufen/Recoverable-Compression
@ d9275944, clip_encoder.py lines 331-334) read CLIP's layer 23."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import PolicyError, parse
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")


def test_kept_patches_are_the_full_width_heads_top_by_hand():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[5] + [SPEC.image_token_id] * 576 + [6]] * 2)
    with vc.apply('policy "w"\nat vit.out keep cls(whole)@vit.layer23 top 40\n', model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        kept = vc.kept_tokens(model)["vit.out#0"]
    layer = model.model.vision_tower.encoder.layers[23]
    with torch.no_grad():
        h = model.model.vision_tower(px, output_hidden_states=True).hidden_states[23]
        x = layer.layer_norm1(h)
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
        row = torch.softmax(q[:, :1] @ k.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)[:, 0, 1:]
        mean = model.model.vision_tower(px, output_attentions=True).attentions[23][:, :, 0, 1:].mean(1)
    want = row.topk(40, dim=1).indices.sort(1).values + 1
    assert torch.equal(kept, want)
    assert not torch.equal(mean.topk(40, dim=1).indices.sort(1).values + 1, want)  # not the head mean


def test_costs_what_the_head_mean_costs_and_only_cls_takes_it():
    whole = estimate(check("at vit.out keep cls(whole)@vit.layer23 top 40", "llava-1.5-7b")).flops
    assert whole == estimate(check("at vit.out keep cls@vit.layer23 top 40", "llava-1.5-7b")).flops
    with pytest.raises(PolicyError, match="read by 'cls' only"):
        parse('policy "w"\nat vit.out keep attn(whole) top 40\n')
    with pytest.raises(PolicyError, match="one head aggregate per score"):
        parse('policy "w"\nat vit.out keep cls(whole, max) top 40\n')
