"""`vnorm` and `vsim`: FlowCut's value-based scores in the ViT. The reference reads the
layer's `v_proj` output through a plain hook and computes both by their definitions:
vnorm = L1 norm of the head-mean value; vsim = per head, the softmax over all tokens of
the CLS value's dot product with each value (unscaled), averaged over heads."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from plain_refs import first_error

SPEC = get_spec("tiny-llava")
from compiled_run import counted_forward
IMG = SPEC.image_token_id
HEADS, DH = SPEC.vit.heads, SPEC.vit.head_dim


@pytest.fixture(scope="module")
def model():
    return SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()


def reference(model, px, layer: int):
    """(vnorm, vsim, cls attention) of ViT `layer` over the 576 patches, by hand."""
    seen = {}
    attn = model.model.vision_tower.encoder.layers[layer].self_attn
    hooks = [getattr(attn, f"{k}_proj").register_forward_hook(lambda m, a, out, k=k: seen.update({k: out[0]}))
             for k in ("q", "k", "v")]
    with torch.no_grad():
        model.model.vision_tower(px)
    for h in hooks:
        h.remove()
    v = seen["v"].view(-1, HEADS, DH).transpose(0, 1)  # [H, n, dh]
    vnorm = v.mean(0).abs().sum(-1)[1:]
    vsim = torch.stack([torch.softmax(v[h] @ v[h, 0], dim=0) for h in range(HEADS)]).mean(0)[1:]
    q = seen["q"].view(-1, HEADS, DH).transpose(0, 1)
    k = seen["k"].view(-1, HEADS, DH).transpose(0, 1)
    cls = torch.stack([torch.softmax(k[h] @ q[h, 0] / DH**0.5, dim=0) for h in range(HEADS)]).mean(0)[1:]
    return vnorm, vsim, cls


def kept(model, px, src):
    ids = torch.tensor([[5, 6] + [IMG] * 16 + [7, 8]])
    with vc.apply(src, model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        return [v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist()]  # vid = 1 + patch


def top16(scores: torch.Tensor) -> list[int]:
    order = torch.argsort(scores, descending=True)
    assert (scores[order[15]] - scores[order[16]]).item() > 1e-7, "near tie"
    return sorted(order[:16].tolist())


def test_value_scores_rank_as_their_definitions(model):
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    vnorm, vsim, cls = reference(model, px, SPEC.feature_layer_index)  # vit.out reads the feature layer
    assert kept(model, px, "at vit.out keep vnorm top 16") == top16(vnorm)
    assert kept(model, px, "at vit.out keep vsim top 16") == top16(vsim)
    # FlowCut's per-layer score, un-normalised: (CLS attention + semantic attention) x value norm
    combined = (cls + vsim) * vnorm
    assert kept(model, px, "at vit.out keep prod(sum(cls, vsim), vnorm) top 16") == top16(combined)
    assert top16(combined) != top16(cls)
    # FlowCut's score exactly: each attention normalised to sum 1 over the patches first
    flowcut = (cls / cls.sum() + vsim / vsim.sum()) * vnorm
    assert kept(model, px, "at vit.out keep prod(sum(share(cls), share(vsim)), vnorm) top 16") == top16(flowcut)


def test_share_divides_by_the_sum_over_the_candidates():
    from vtdsl.compiler.runtime import StageView, evaluate_score
    from vtdsl.ir.plan import Observation, ResolvedScore

    a, b = Observation("cls", (), "vit", 3, "cls"), Observation("norm", (), "vit", 3, "none")
    values = {a: torch.tensor([[1.0, 3.0, float("nan")]]), b: torch.tensor([[10.0, 30.0, 60.0]])}
    view = StageView(torch.zeros(1, 3, 2), None, lambda obs: values[obs])
    share = lambda o: ResolvedScore("share", args=(ResolvedScore("leaf", o),))  # noqa: E731
    got = evaluate_score(ResolvedScore("sum", args=(share(a), share(b))), view)
    torch.testing.assert_close(got[0, :2], torch.tensor([0.25 + 0.1, 0.75 + 0.3]))
    assert torch.isnan(got[0, 2])  # unobserved stays unobserved


def test_vsim_cost_equals_the_counted_matmul(model):
    ids = torch.tensor([[5, 6] + [IMG] * 64 + [7, 8]])
    px = torch.randn(1, 3, 336, 336)
    src = "at vit.layer6 keep prod(sum(cls, vsim), vnorm) top 200; at vit.out keep vsim top 64"
    flops, _, _ = counted_forward(model, src, input_ids=ids, pixel_values=px)
    assert flops == estimate(check(src, SPEC), text_tokens=4, logits="all").flops


@pytest.mark.parametrize("src, words", [
    ("at llm.layer2 keep vnorm top 8", "only available at ViT layers"),
    ("at vit.out keep vsim(max) top 8", "reads no attention heads"),
    ("at vit.out keep share(cls, vsim) top 8", "normalises one score"),
])
def test_value_scores_misuse(src, words):
    assert words in first_error(src, SPEC).message
