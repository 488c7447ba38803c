"""`gnorm`: the L2 norm of a token after the input norm of the layer that reads it next
(LLM `input_layernorm`, CLIP `layer_norm1`). The reference runs the plain model with
`output_hidden_states`, applies that layer's norm module by hand and ranks the norms.

A random tiny model has unit norm gains, which make every token's normed length sqrt(d)
(up to eps): the fixture gives the norms random gains (and CLIP's a random bias), as
trained ones have, so the ranking means something and differs from `norm`'s."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from plain_refs import first_error

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


@pytest.fixture(scope="module")
def model():
    m = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in m.model.language_model.layers:
            layer.input_layernorm.weight.copy_(torch.rand(SPEC.llm.hidden, generator=g) * 2)
        for layer in m.model.vision_tower.encoder.layers:
            layer.layer_norm1.weight.copy_(torch.rand(SPEC.vit.hidden, generator=g) * 2)
            layer.layer_norm1.bias.copy_(torch.randn(SPEC.vit.hidden, generator=g))
    return m


def prompt():
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10]])
    return ids, torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(4))


def top(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.argsort(scores, descending=True)
    assert (scores[order[k - 1]] - scores[order[k]]).item() > 1e-6, "near tie"
    return sorted(order[:k].tolist())


def test_llm_gnorm_keeps_the_largest_normed_inputs(model):
    ids, px = prompt()
    with torch.no_grad():
        hidden = model(input_ids=ids, pixel_values=px, output_hidden_states=True).hidden_states
        entering = hidden[3][0]  # the tokens entering llm.layer3 (layer 2's output)
        normed = model.model.language_model.layers[3].input_layernorm(entering)
    image = (ids[0] == IMG).nonzero().flatten()
    want = top(normed.norm(dim=-1)[image], 20)
    assert want != top(entering.norm(dim=-1)[image], 20)  # not `norm` under another name
    with vc.apply("at llm.layer3 keep gnorm top 20", model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        kept = vc.kept_tokens(model)["llm.layer3#0"][0]
    assert kept.tolist() == image[want].tolist()


def test_vit_gnorm_keeps_the_largest_normed_patches(model):
    _, px = prompt()
    tower = model.model.vision_tower
    with torch.no_grad():
        entering = tower(px, output_hidden_states=True).hidden_states[10][0]  # layer 9's output
        normed = tower.encoder.layers[10].layer_norm1(entering)
    want = top(normed.norm(dim=-1)[1:], 100)  # patches; CLS is always kept
    assert want != top(entering.norm(dim=-1)[1:], 100)
    ids = torch.tensor([[5, 6] + [IMG] * 100 + [7, 8]])
    with vc.apply("at vit.layer10 keep gnorm top 100", model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        kept = vc.kept_tokens(model)["vit.layer10#0"][0]
    assert [v - 1 for v in kept.tolist()] == want  # vid = 1 + patch


def test_gnorm_costs_nothing_and_needs_a_next_layer():
    assert estimate(check("at llm.layer3 keep gnorm top 20", SPEC)).policy.scorers == 0
    assert estimate(check("at vit.out keep gnorm top 64", SPEC)).policy.scorers == 0
    d = first_error("at llm.layer2 keep gnorm@vit.layer23 top 64", SPEC)  # 24 ViT layers
    assert d.code == "scorer-site" and "no layer 24" in d.message
    assert first_error("at llm.layer3 keep gnorm(max) top 20", SPEC).message == "'gnorm' reads no attention heads"
