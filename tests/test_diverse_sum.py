"""`diverse(sum)`: greedy max-sum diversification (ToDRE), seeded by the tokens earlier
terms kept. Expected picks come from hand geometry and from a plain loop written here."""

from __future__ import annotations

import math

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl import ops
from vtdsl.ir import check
from vtdsl.lang import PolicyError, format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_max_sum_differs_from_max_min_by_hand():
    # seeds at 0, 5 and 180 degrees; candidates at 90 and 175 degrees.
    # 90: distances 1, 1 - cos 85 = 0.913, 1 -> min 0.913, sum 2.913
    # 175: distances 1.996, 1.985, 1 - cos 5 = 0.004 -> min 0.004, sum 3.985
    x = torch.tensor([[_unit(0), _unit(5), _unit(180), _unit(90), _unit(175)]])
    seeds = torch.tensor([[True, True, True, False, False]])
    assert ops.diverse_sum(x, 1, seed_mask=seeds).tolist() == [[4]]
    assert ops.diverse(x, 1, seed_mask=seeds).tolist() == [[3]]


def test_first_pick_without_seeds_is_the_largest_summed_distance():
    # 0, 10, 20 and 120 degrees: 120 is farthest from the rest in sum; then the sums to
    # {120} decide: 0 (1.5) beats 10 (1.342) and 20 (1.174)
    x = torch.tensor([[_unit(0), _unit(10), _unit(20), _unit(120)]])
    assert ops.diverse_sum(x, 2).tolist() == [[0, 3]]


def test_language_forms():
    policy = parse("at llm.layer0 keep cls@vit.layer22 top 1 + diverse( sum ) 57")
    assert format_policy(policy) == "at llm.layer0 keep cls@vit.layer22 top 1 + diverse(sum) 57\n"
    assert from_yaml(to_yaml(policy)) == policy
    assert check(policy, "llava-1.5-7b").stages[0].terms[1].spread == "sum"
    with pytest.raises(PolicyError) as err:
        parse("at vit.out keep uniform(sum) 5")
    d = err.value.diagnostics[0]
    assert d.span.column == 24 and "belongs to 'diverse'" in d.message


def _plain_max_sum(feats: torch.Tensor, pivot: int, k: int) -> list[int]:
    f = feats.double()
    f = f / f.norm(dim=-1, keepdim=True)
    dist = (1 - f @ f.T).tolist()
    chosen = [pivot]
    total = list(dist[pivot])
    for _ in range(k):
        best = max((j for j in range(len(total)) if j not in chosen), key=lambda j: (total[j], -j))
        chosen.append(best)
        total = [t + dist[best][j] for j, t in enumerate(total)]
    return sorted(chosen)


def test_compiled_keeps_the_pivot_and_the_max_sum_set():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.model.vision_tower(px, output_attentions=True, output_hidden_states=True)
        cls = out.attentions[SPEC.feature_layer_index][0, :, 0, 1:].mean(0)
        feats = model.model.multi_modal_projector(out.hidden_states[SPEC.vision_feature_layer][:, 1:])[0]
    pivot = int(cls.argmax())
    want = _plain_max_sum(feats, pivot, 20)
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9]])
    kept = {}
    for src in ("at llm.layer0 keep cls@vit.layer22 top 1 + diverse(sum) 20",
                "at llm.layer0 keep cls@vit.layer22 top 1 + diverse 20"):
        with vc.apply(src, model), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
            kept[src] = sorted(p - 3 for p in vc.kept_tokens(model)["llm.layer0#0"][0].tolist())
    got, max_min = kept.values()
    assert got == want
    assert max_min != want  # the two criteria pick different sets here
