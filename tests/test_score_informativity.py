"""`informativity` (Turbo's information degree): the patches a ViT stage keeps equal a
hand computation on the plain CLIP layer (its own q/k projections, the CLS softmax row,
the head-mean keys' cosine to the other half), written from Turbo's paper (Sec. 3:
mutual redundancy minus alpha-weighted semantic value) and its merge.py; the LLM
refuses it at the term."""

from __future__ import annotations

import math

import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from plain_refs import first_error

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


def _model():
    m = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():  # peaked CLS attention, as in a trained tower: the value term matters
        for layer in m.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return m


def _merged_away(layer, h: torch.Tensor, r: int, alpha: float) -> list[int]:
    """Patch indices (0-based) of the r A tokens with the highest redundancy - 30·alpha·value,
    by a loop over tokens; h is ``[n, d]`` with CLS at 0."""
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    heads, dh = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(-1, heads, dh)
    k = attn.k_proj(x).view(-1, heads, dh)
    value = [sum(torch.softmax(q[0, hd] @ k[:, hd].T / math.sqrt(dh), dim=0)[t].item() for hd in range(heads)) / heads
             for t in range(h.shape[0])]
    key = k.mean(1)
    key = key / key.norm(dim=-1, keepdim=True)
    places_b = list(range(1, h.shape[0], 2))
    merge_score = {}
    for place in range(2, h.shape[0], 2):  # A without CLS
        redundancy = max((key[place] @ key[b]).item() for b in places_b)
        merge_score[place - 1] = redundancy - 30 * alpha * value[place]
    order = sorted(merge_score, key=lambda j: -merge_score[j])
    assert merge_score[order[r - 1]] - merge_score[order[r]] > 1e-6, "near tie"
    return sorted(order[:r])


def test_vit_stage_drops_turbos_merge_sources():
    model = _model()
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    tower = model.model.vision_tower
    with torch.no_grad():
        entering = tower(px, output_hidden_states=True).hidden_states[4][0]  # the input of layer 4
        want = _merged_away(tower.encoder.layers[4], entering, 40, alpha=5)
        tome = _merged_away(tower.encoder.layers[4], entering, 40, alpha=0)
    assert want != tome  # the semantic value changes the choice
    ids = torch.tensor([[5, 6] + [IMG] * 536 + [7, 8]])
    with vc.apply("at vit.layer5 keep informativity top 536", model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        kept = vc.kept_tokens(model)["vit.layer5#0"][0].tolist()
    assert sorted(set(range(576)) - {v - 1 for v in kept}) == want  # vid = 1 + patch


def test_informativity_is_costed_and_vit_only():
    """The CLS row (2·n·width) and the A x B cosines of head-mean keys (2·|A|·|B|·head
    width), n = 577 tokens entering layer 4: A = places 2, 4, ..., 576, B = 1, 3, ..., 575."""
    width = SPEC.vit.heads * SPEC.vit.head_dim
    flops = estimate(check("at vit.layer5 keep informativity top 536", SPEC)).policy.scorers
    assert flops == 2 * 577 * width + 2 * len(range(2, 577, 2)) * len(range(1, 577, 2)) * SPEC.vit.head_dim
    d = first_error("at llm.layer2 keep informativity top 64", SPEC)
    assert d.code == "scorer-site" and "informativity" in d.message
