"""`then absorb K` (PruMerge): each kept token adds the score-weighted sum of its K most
similar other tokens; the dropped tokens, score-weighted, are summed into one more token.
The reference follows PruMerge's released loop (one kept token at a time, candidates = all
the other tokens, cosine similarity, top K, x_i + Σ s_j x_j) on features and CLS attention
computed here by a plain loop over the CLIP layers."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import clip_cls_scores, first_error

SPEC = get_spec("tiny-llava")
from compiled_run import counted_forward
IMG = SPEC.image_token_id
F = SPEC.feature_layer_index  # 22


@pytest.fixture(scope="module")
def model():
    return SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()


def prumerge_reference(model, px, keep: int, k: int) -> torch.Tensor:
    vt = model.model.vision_tower
    with torch.no_grad():
        h = vt.pre_layrnorm(vt.embeddings(px))
        for i, layer in enumerate(vt.encoder.layers[: F + 1]):
            if i == F:
                attn = clip_cls_scores(layer, h)[0]  # CLS attention of the feature layer, head mean
            h = layer(h, None)
        x = h[0, 1:]  # the feature layer's patches
        kept = torch.topk(attn, keep).indices.sort().values.tolist()
        unit = torch.nn.functional.normalize(x, dim=-1)
        rows = []
        for i in kept:
            others = [j for j in range(x.shape[0]) if j != i]
            sims = unit[others] @ unit[i]
            order = sorted(range(len(others)), key=lambda t: (-float(sims[t]), others[t]))[:k]
            nbrs = [others[t] for t in order]
            rows.append(x[i] + sum(attn[j] * x[j] for j in nbrs))
        dropped = [j for j in range(x.shape[0]) if j not in kept]
        rows.append(sum(attn[j] * x[j] for j in dropped))
        return model.model.multi_modal_projector(torch.stack(rows))


def test_absorb_features_match_prumerges_loop(model):
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(6))
    want = prumerge_reference(model, px, keep=32, k=32)
    with vc.apply("at vit.out keep cls top 32 then absorb 32", model), torch.no_grad():
        got = model.model.get_image_features(pixel_values=px).pooler_output[0]
        ids = torch.tensor([[5, 6] + [IMG] * 576 + [7, 8]])
        gen = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
    assert got.shape == (33, SPEC.llm.hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert gen.shape[1] == ids.shape[1] + 3 and torch.equal(gen[:, :-3], ids)  # the caller's prompt, then 3 new


def test_absorb_forms_cost_and_errors(model):
    src = "at vit.out keep cls top 32 then absorb 32"
    assert format_policy(parse(src)).strip() == src and from_yaml(to_yaml(parse(src))) == parse(src)
    ids = torch.tensor([[5, 6] + [IMG] * 576 + [7, 8]])
    px = torch.randn(1, 3, 336, 336)
    both = "at vit.out keep cls top 100 then absorb 10%; at llm.layer2 keep text top 20 then absorb 8"
    flops, _, _ = counted_forward(model, both, input_ids=ids, pixel_values=px)
    assert flops == estimate(check(both, SPEC), text_tokens=4, logits="all").flops
    for bad, at, words in [
        ("at vit.out keep uniform 32 then absorb 32", "uniform", "no score"),
        ("at vit.out keep cls top 576 then absorb 32", "32", "needs dropped tokens"),
        ("at vit.out keep cls top 32 then absorb 600", "600", "neighbours among the 575 others"),
    ]:
        d = first_error(bad, SPEC)
        assert (d.span.line, d.span.column) == (1, bad.rindex(at) + 1) and words in d.message
