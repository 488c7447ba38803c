"""`per region RxC proportional`: each region's share of the budget follows its mean
score (HoloV's crop budget). Expected shares are worked out by hand or by a plain loop."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl import ops
from vtdsl.ir import PolicyError, check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


@pytest.mark.parametrize("means, k, want", [
    ([3.0, 1.0], 8, [6, 2]),                # 8 * 3/4, 8 * 1/4: no remainder
    ([1.0, 1.0, 1.0], 8, [3, 3, 2]),        # floors 2 2 2; the 2 left go to regions 0, 1 (tie: lower index)
    ([0.5, 0.3, 0.2], 7, [4, 2, 1]),        # floors 3 2 1 (3.5, 2.1, 1.4); the 1 left to the best region
    ([0.0, 0.0], 5, [3, 2]),                # nothing scored: even split
])
def test_shares_by_hand(means, k, want):
    # two tokens per region, both at the region's mean
    region_ids = torch.tensor([[g for g in range(len(means)) for _ in range(2)]])
    scores = torch.tensor([[m for m in means for _ in range(2)]])
    got = ops.proportional_shares(scores, region_ids, len(means), k)
    assert got.tolist() == [want]


def test_language_forms_and_checks():
    src = "at vit.out keep cls top 64 + diverse 8 per region 16x1 proportional\n"
    policy = parse(src)
    assert format_policy(policy) == src
    assert from_yaml(to_yaml(policy)) == policy
    assert "per: region 16x1 proportional" in to_yaml(policy)
    assert check(policy, "llava-1.5-7b").stages[0].region_proportional
    with pytest.raises(PolicyError) as err:
        check("at vit.out keep uniform 64 per region 4x4 proportional", "llava-1.5-7b")
    d = err.value.diagnostics[0]
    assert (d.span.line, d.span.column) == (1, 17) and "has no score" in d.message


def _cls_attention(model, px) -> list[float]:
    """CLS row of the feature layer's eager attention, head mean, over the 576 patches."""
    with torch.no_grad():
        out = model.model.vision_tower(px, output_attentions=True)
    return out.attentions[SPEC.feature_layer_index][0, :, 0, 1:].mean(0).tolist()


def _reference(scores: list[float], k: int, bands: int, grid: int = 24) -> list[int]:
    """Plain loop over a `bands x bands` split of the grid: region means, floor shares,
    the rest one each to the best regions, then the top share of each region."""
    region = [(p // grid) * bands // grid * bands + (p % grid) * bands // grid for p in range(grid * grid)]
    members = [[p for p in range(grid * grid) if region[p] == g] for g in range(bands * bands)]
    means = [sum(scores[p] for p in m) / len(m) for m in members]
    total = sum(means)
    shares = [int(k * m / total) for m in means]
    best = sorted(range(len(means)), key=lambda g: (-means[g], g))
    for i in range(k - sum(shares)):
        shares[best[i % len(best)]] += 1
    kept = []
    for g, m in enumerate(members):
        order = sorted(m, key=lambda p: (-scores[p], p))
        assert scores[order[shares[g] - 1]] - scores[order[shares[g]]] > 1e-7, "near tie"
        kept += order[:shares[g]]
    return sorted(kept), shares


def test_compiled_keeps_the_proportional_top_tokens():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    scores = _cls_attention(model, px)
    want, shares = _reference(scores, 64, 4)
    assert len(set(shares)) > 1  # the shares really differ from an even split
    ids = torch.tensor([[5, 6] + [IMG] * 64 + [7, 8]])
    with vc.apply("at vit.out keep cls top 64 per region 4x4 proportional", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept = sorted(v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist())  # vid = 1 + patch
    assert kept == want
    with vc.apply("at vit.out keep cls top 64 per region 4x4", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        even_kept = sorted(v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist())
    assert even_kept != kept
