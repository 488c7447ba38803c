"""Arithmetic combination of scores: constant weights (`sum(1000 * cls, 0.1 * norm)`) and
`prod(...)` (HoloV's weighted sum, FlowCut's product). The oracle ranks a plain
combination of eager CLS attention and hidden-state norms computed here."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.ir import check
from vtdsl.lang import PolicyError, format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id
K = 48


def test_parses_formats_and_round_trips():
    policy = parse("at vit.out keep sum( 1e3*cls , 0.10 * norm ) top 64 + prod(cls, norm) top 8")
    text = format_policy(policy)
    assert text == "at vit.out keep sum(1000 * cls, 0.1 * norm) top 64 + prod(cls, norm) top 8\n"
    assert parse(text) == policy and from_yaml(to_yaml(policy)) == policy
    assert policy.stages[0].action.terms[0].score.weights == [1000.0, 0.1]
    assert policy.stages[0].action.terms[1].score.weights is None  # unweighted: all 1
    plan = check(policy, "llava-1.5-7b")
    assert plan.stages[0].terms[0].score.weights == (1000.0, 0.1)


@pytest.mark.parametrize("src, column, message", [
    ("at vit.out keep cls@vit.layer8..22 prod top 3", 36, "unexpected keyword 'prod'"),
    ("at vit.out keep sum(cls, 2 norm) top 3", 28, "unexpected word 'norm'"),
    ("at vit.out keep sum(cls, 2 *) top 3", 29, "unexpected ')'"),
    ("at vit.out keep cls(prod) top 3", 21, "unexpected keyword 'prod'"),
])
def test_misuse_is_located(src, column, message):
    with pytest.raises(PolicyError) as err:
        parse(src)
    d = err.value.diagnostics[0]
    assert d.span.column == column and message in d.message


@pytest.fixture(scope="module")
def model_and_inputs():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model.model.vision_tower(px, output_attentions=True, output_hidden_states=True)
    cls = out.attentions[SPEC.feature_layer_index][0, :, 0, 1:].mean(0)  # feature layer, head mean
    norm = out.hidden_states[SPEC.vision_feature_layer][0, 1:].norm(dim=-1)  # its output's L2 norm
    return model, px, cls, norm


def _top(values: torch.Tensor, k: int) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: -values[i].item())
    assert (values[order[k - 1]] - values[order[k]]).abs().item() > 1e-6 * values.abs().max().item()
    return sorted(order[:k])


def _kept(model, px, src: str) -> list[int]:
    ids = torch.tensor([[5, 6] + [IMG] * K + [7, 8]])
    with vc.apply(src, model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        return sorted(v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist())  # vid = 1 + patch


@pytest.mark.parametrize("src, combine", [
    (f"at vit.out keep sum(1000 * cls, 0.1 * norm) top {K}", lambda cls, norm: 1000 * cls + 0.1 * norm),
    (f"at vit.out keep prod(cls, norm) top {K}", lambda cls, norm: cls * norm),
    (f"at vit.out keep max(1000 * cls, 0.28 * norm) top {K}", lambda cls, norm: torch.maximum(1000 * cls, 0.28 * norm)),
])
def test_compiled_ranks_by_the_plain_combination(model_and_inputs, src, combine):
    model, px, cls, norm = model_and_inputs
    want = _top(combine(cls, norm), K)
    assert want != _top(cls, K) and want != _top(norm, K)  # both scores matter
    assert _kept(model, px, src) == want
