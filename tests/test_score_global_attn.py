"""`global_attn` (VFlowOpt's importance map): the patches a ViT stage keeps equal a hand
computation on the plain CLIP attention (written from the paper's description and
SigLipEncoderLayer.forward: the rows of the tokens receiving over t x the mean attention,
averaged), with sinks made by hand; without a global token it ranks like `attn`; the LLM
refuses it; its cost is the full attention map."""

from __future__ import annotations

import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from plain_refs import first_error

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id
T = 39.26492840997221


def _model(sinks: bool):
    m = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in m.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
        if sinks:  # keys of tokens along v meet every query: they receive most attention
            k = m.model.vision_tower.encoder.layers[12].self_attn.k_proj.weight
            q = m.model.vision_tower.encoder.layers[12].self_attn.q_proj.weight
            u = q.sum(1)
            k.add_(40 * torch.outer(u / u.norm(), torch.randn(k.shape[1], generator=g)))
    return m


def _hand_map(probs: torch.Tensor) -> tuple[list[float], int]:
    """probs ``[H, n, n]`` -> (the map over the patches, number of global tokens)."""
    mean = probs.mean(0)
    n = mean.shape[0]
    received = [sum(mean[i, j].item() for i in range(n)) / n for j in range(n)]
    average = sum(received) / n
    rows = [j for j in range(n) if received[j] > T * average] or list(range(n))
    return [sum(mean[i, j].item() for i in rows) / len(rows) for j in range(1, n)], len(rows)


def _kept(model, stage: str, count: int, px) -> list[int]:
    ids = torch.tensor([[5, 6] + [IMG] * count + [7, 8]])
    with vc.apply(stage, model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        return sorted(v - 1 for v in next(iter(vc.kept_tokens(model).values()))[0].tolist())


def _top(values: list[float], k: int) -> list[int]:
    order = sorted(range(len(values)), key=lambda j: -values[j])
    assert values[order[k - 1]] - values[order[k]] > 1e-7, "near tie"
    return sorted(order[:k])


def _run(sinks: bool):
    """(the hand map over the patches, its global token count, layer 12's probs, the
    patches `at vit.layer13 keep global_attn top 100` keeps)."""
    model = _model(sinks)
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        probs = model.model.vision_tower(px, output_attentions=True).attentions[12][0]
    scores, globals_ = _hand_map(probs)
    return scores, globals_, probs, _kept(model, "at vit.layer13 keep global_attn top 100", 100, px)


def test_vit_stage_keeps_the_top_of_the_global_tokens_map():
    scores, globals_, probs, kept = _run(sinks=True)
    assert 1 <= globals_ < 20  # a few sinks, not every row
    want = _top(scores, 100)
    assert want != _top(probs.mean(0).mean(0)[1:].tolist(), 100)  # not `attn`
    assert kept == want


def test_without_a_global_token_every_row_counts():
    scores, globals_, _, kept = _run(sinks=False)
    assert globals_ == 577
    assert kept == _top(scores, 100)


def test_global_attn_is_costed_and_vit_only():
    width = SPEC.vit.heads * SPEC.vit.head_dim
    flops = estimate(check("at vit.layer13 keep global_attn top 100", SPEC)).policy.scorers
    assert flops == 2 * 577 * 577 * width + 2 * 577 * 577
    d = first_error("at llm.layer2 keep global_attn top 64", SPEC)
    assert d.code == "scorer-site" and "global_attn" in d.message
