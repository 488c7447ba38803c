"""`attn(visual)`: attention received from the visual tokens' queries only (VisionDrop)."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import PolicyError, check
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


def test_is_an_llm_query_set_refused_in_the_vit():
    with pytest.raises(PolicyError) as err:
        check("at vit.layer8 keep attn(visual) top 50%", "llava-1.5-7b")
    (diag,) = err.value.diagnostics
    assert "every query is a visual token" in diag.message and diag.span.column == 20


def test_cost_counts_one_attention_row_per_visual_token():
    plain = estimate(check("at llm.layer2 keep attn top 50%", "llava-1.5-7b"), text_tokens=64)
    visual = estimate(check("at llm.layer2 keep attn(visual) top 50%", "llava-1.5-7b"), text_tokens=64)
    spec = get_spec("llava-1.5-7b")
    n = 64 + 576  # keys of layer 1
    per_row = 2 * n * spec.llm.heads * spec.llm.head_dim  # q.k and p.v per query row
    assert plain.policy.scorers - visual.policy.scorers == 64 * per_row  # the text rows are gone


def test_compiled_keeps_the_top_of_image_to_image_attention():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10, 11]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px, output_attentions=True)
    img = list(range(3, 3 + 576))
    att = out.attentions[1][0][:, img][:, :, img].mean(dim=(0, 1)).tolist()  # heads, image query rows
    order = sorted(range(576), key=lambda i: -att[i])
    k = next(k for k in range(200, 400) if att[order[k - 1]] - att[order[k]] > 1e-6)
    with vc.apply(f"at llm.layer2 keep attn(visual) top {k}", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept = vc.kept_tokens(model)["llm.layer2#0"][0].tolist()
    assert sorted(kept) == sorted(img[i] for i in order[:k])
