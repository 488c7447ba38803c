"""`per region RxC proportional`: each region's share of the budget follows its mean
score (HoloV's crop budget). Expected shares are worked out by hand or by a plain loop."""

from __future__ import annotations

import math

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


@pytest.fixture(scope="module")
def vit_sharpened():
    """tiny-llava with sharper ViT attention (clear CLS-attention ranks) and one image."""
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model, torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(3))


def test_compiled_keeps_the_proportional_top_tokens(vit_sharpened):
    model, px = vit_sharpened
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


# ---------------------------------------------------------------------------- per chunk N
def holov_reference(features: torch.Tensor, attention: list[float], chunks: int, k: int, eps: float = 1e-6):
    """HoloV's selection as its release computes it (obananas/HoloV, `HoloV()`), by loops:
    contiguous chunks (the first n % chunks one longer); token score = 1e3·attn +
    0.09·(variance of its in-chunk cosine similarities, the zeroed diagonal included,
    rescaled by mean|1e3·attn| / mean|var|); chunk budget = floor(k · mean score / total),
    the rest one each to the best chunks; in a chunk, the top of its budget by attention."""
    n = len(attention)
    size, extra = divmod(n, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        end = start + size + (1 if c < extra else 0)
        bounds.append((start, end))
        start = end
    chunk_scores = []
    for a, b in bounds:
        x = features[a:b].double()
        f = x / (x.norm(dim=1, keepdim=True) + eps)
        m = b - a
        sim = [[float(f[i] @ f[j]) if i != j else 0.0 for j in range(m)] for i in range(m)]
        mean = [sum(row) / (m - 1) for row in sim]
        var = [sum((v - mean[i]) ** 2 for v in sim[i]) / (m - 1) for i in range(m)]
        att = [1e3 * attention[a + i] for i in range(m)]
        scale = (sum(abs(v) for v in att) / m) / (sum(abs(v) for v in var) / m + eps)
        chunk_scores.append(sum(att[i] + 0.09 * var[i] * scale for i in range(m)) / m)
    weights = [s / (sum(chunk_scores) + eps) for s in chunk_scores]
    shares = [math.floor(w * k) for w in weights]
    best = sorted(range(chunks), key=lambda c: (-weights[c], c))
    for c in best[:k - sum(shares)]:
        shares[c] += 1
    kept = []
    for (a, b), share in zip(bounds, shares):
        order = sorted(range(a, b), key=lambda p: (-attention[p], p))
        if share < b - a:
            assert attention[order[share - 1]] - attention[order[share]] > 1e-7, "near tie"
        kept += order[:share]
    return sorted(kept), shares


def test_per_chunk_proportional_is_holov_selection(vit_sharpened):
    """HoloV's holistic score averages to 1.09 x 1e3 x the chunk's mean attention (the
    variance term is rescaled to the attention's mean), so `cls top k per chunk 16
    proportional` keeps exactly HoloV's tokens: checked against the full computation."""
    model, px = vit_sharpened
    attention = _cls_attention(model, px)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=px).pooler_output[0]  # after the projector
    want, shares = holov_reference(features, attention, 16, 64)
    assert len(set(shares)) > 1
    ids = torch.tensor([[5, 6] + [IMG] * 64 + [7, 8]])
    src = "at vit.out keep cls top 64 per chunk 16 proportional"
    with vc.apply(src, model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept = sorted(v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist())
    assert kept == want
    # 36-token chunks cut rows in half: not the same as 16 bands of whole rows
    with vc.apply("at vit.out keep cls top 64 per region 16x1 proportional", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        bands = sorted(v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist())
    assert bands != kept


def test_per_chunk_forms_and_chunk_ids():
    src = "at llm.layer2 keep text top 20 per chunk 3\n"
    assert format_policy(parse(src)) == src and from_yaml(to_yaml(parse(src))) == parse(src)
    assert ops.split_chunks(8, 3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(PolicyError) as err:
        check("at vit.out keep cls top 64 per chunk 600", "llava-1.5-7b")
    assert "empty chunks" in err.value.diagnostics[0].message
