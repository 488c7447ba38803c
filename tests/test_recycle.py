"""`then recycle N into M` (SparseVLM v1): the N dropped tokens the first term scores
highest are clustered by DPC-kNN into M tokens that are kept too.

References here are plain: DPC-kNN written as loops over float64 tensors from its
definition, and a loop over the HF decoder layers that rebuilds the pruned sequence
(kept rows, cluster means at their centres' rows, re-numbered positions) by hand."""

from __future__ import annotations

import math

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl import ops
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import first_error

SPEC = get_spec("tiny-llava")
from compiled_run import counted_forward
IMG = SPEC.image_token_id
P = 576


def dpc_knn_reference(feats: torch.Tensor, c: int):
    """Centres (best first) and members of DPC-kNN with k = c neighbours, by loops."""
    x = feats.double()
    m, d = x.shape
    dist = [[math.sqrt(float(((x[i] - x[j]) ** 2).sum())) / math.sqrt(d) for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) for row in dist]
    by_density = sorted(range(m), key=lambda i: (-density[i], i))
    rank = {i: r for r, i in enumerate(by_density)}
    far = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(m) if rank[j] < rank[i]], default=far) for i in range(m)]
    score = [delta[i] * density[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:c]
    members = {ci: [] for ci in range(c)}
    for i in range(m):
        if i in centres:
            members[centres.index(i)].append(i)
        else:
            members[min(range(c), key=lambda ci: (dist[i][centres[ci]], ci))].append(i)
    return centres, members


def test_recycle_clusters_matches_the_loop_definition():
    g = torch.Generator().manual_seed(0)
    # points in three blobs (clear density peaks), scores picking who is recycled
    centres_true = torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    x = torch.cat([centres_true[i % 3] + 0.3 * torch.randn(4, generator=g) for i in range(30)]).view(1, 30, 4)
    kept = torch.tensor([[0, 7, 11, 20]])
    scores = torch.randn(1, 30, generator=g)
    out, centres = ops.recycle_clusters(x, kept, scores, m=12, c=3)
    dropped = [i for i in range(30) if i not in kept[0].tolist()]
    recycled = sorted(dropped, key=lambda i: (-float(scores[0, i]), i))[:12]
    ref_centres, members = dpc_knn_reference(x[0, recycled], 3)
    assert centres[0].tolist() == [recycled[i] for i in ref_centres]
    assert torch.equal(out[0, :4], x[0, kept[0]])
    for ci in range(3):
        want = x[0, [recycled[i] for i in members[ci]]].mean(0)
        torch.testing.assert_close(out[0, 4 + ci], want)
    assert sum(len(v) for v in members.values()) == 12


def test_language_forms_and_located_errors():
    src = "at llm.layer3 keep text(all) top 300 then recycle 83 into 9 renumber"
    policy = parse(src)
    assert format_policy(policy).strip() == src
    assert format_policy(from_yaml(to_yaml(policy))).strip() == src
    plan = check(src, SPEC)
    rest = plan.stages[0].rest
    assert (rest.count, rest.clusters) == (83, 9) and plan.stages[0].tokens_out == 309
    # percentages: of the dropped tokens, then of the recycled ones
    rest = check("at llm.layer3 keep text top 300 then recycle 30% into 10%", SPEC).stages[0].rest
    assert (rest.count, rest.clusters) == (83, 8)
    for bad, at, words in [
        ("at llm.layer3 keep uniform 300 then recycle 83 into 9", "uniform", "first term's score"),
        ("at llm.layer3 keep text top 300 then recycle 300 into 9", "300 into", "of the 276 tokens"),
        ("at llm.layer3 keep text top 300 then recycle 83 into 90", "90", "clusters of 83"),
    ]:
        d = first_error(bad, SPEC)
        assert (d.span.line, d.span.column) == (1, bad.index(at) + 1) and words in d.message


@pytest.fixture(scope="module")
def model():
    m = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():  # spread the random attention so rankings have clear gaps
        for name, mod in m.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                mod.weight.mul_(12.0)
    return m


def prompt():
    ids = torch.tensor([[5, 6, 7] + [IMG] * P + [8, 9, 10, 11]])
    return ids, torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))


def recycled_reference(model, ids, px, layer: int, keep: int, m: int, c: int, new_tokens: int):
    """Greedy tokens of `at llm.layer{layer} keep text(all) top {keep} then recycle m into c
    renumber`, recomputing the whole sequence per token with the prefill's choice."""
    lm = model.model.language_model
    seen = []
    handle = lm.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["inputs_embeds"].clone()),
                                          with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=px)
    handle.remove()
    embeds = seen[0][0]
    img = ids[0] == IMG
    rows = img.nonzero().flatten()
    plan = None
    tokens = []
    with torch.no_grad():
        for _ in range(new_tokens):
            h = torch.cat([embeds] + [lm.embed_tokens(t.view(1)) for t in tokens])[None]
            is_img = torch.cat([img, torch.zeros(len(tokens), dtype=torch.bool)])
            pos = torch.arange(h.shape[1])
            for j, mod in enumerate(lm.layers):
                if j == layer:
                    if plan is None:  # the prompt decides once
                        s = weights[:, ~is_img][:, :, rows].mean((0, 1))  # heads, text query rows
                        order = torch.argsort(s, descending=True)
                        assert (s[order[keep - 1]] - s[order[keep]]).item() > 1e-7
                        chosen = order[:keep]
                        rest = [int(i) for i in order[keep:]]  # dropped, best score first
                        recycled = rest[:m]
                        centres, members = dpc_knn_reference(h[0, rows[recycled]], c)
                        plan = (chosen, recycled, centres, members)
                    chosen, recycled, centres, members = plan
                    # v1: the kept visual rows in order, then the cluster means (in the
                    # centres' order), then the text
                    clusters = [h[0, rows[[recycled[i] for i in members[ci]]]].mean(0) for ci in range(len(centres))]
                    start, end = int(rows[0]), int(rows[-1]) + 1
                    h = torch.cat([h[:, :start], h[:, rows[chosen.sort().values]], torch.stack(clusters)[None],
                                   h[:, end:]], dim=1)
                    is_img = torch.cat([is_img[:start], torch.ones(len(chosen) + len(centres), dtype=torch.bool),
                                        is_img[end:]])
                    pos = torch.arange(h.shape[1])  # renumber: contiguous again
                n = h.shape[1]
                mask = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                                           torch.finfo(h.dtype).min)
                captured = {}
                hook = mod.self_attn.register_forward_hook(lambda mo, a, out: captured.update(w=out[1]))
                out = mod(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, pos[None]),
                          position_ids=pos[None])
                hook.remove()
                h = out[0] if isinstance(out, tuple) else out
                if j == layer - 1:
                    weights = captured["w"][0]  # [heads, n, n]
            logits = model.lm_head(lm.norm(h))[0, -1]
            first_logits = logits if not tokens else first_logits
            tokens.append(logits.argmax())
    return torch.cat([ids[0], torch.stack(tokens)]), plan, first_logits


def test_llm_recycle_generate_matches_the_plain_loop(model):
    ids, px = prompt()
    want, (chosen, recycled, centres, _), want_logits = recycled_reference(model, ids, px, layer=3, keep=300,
                                                                          m=83, c=9, new_tokens=5)
    src = "at llm.layer3 keep text(all) top 300 then recycle 83 into 9 renumber"
    with vc.apply(src, model):
        with torch.no_grad():
            got = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=5, do_sample=False)
            # the greedy tokens rarely see where the clusters sit; the logits do
            logits = model(input_ids=ids, pixel_values=px).logits[0, -1]
        kept = vc.kept_tokens(model)["llm.layer3#0"][0]
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-4)
    first = 3  # prompt rows before the image
    want_kept = sorted([first + int(i) for i in chosen] + [first + recycled[ci] for ci in centres])
    assert kept.tolist() == want_kept
    assert torch.equal(got[0], want)


def test_recycled_stage_flops_equal_the_cost_model(model):
    ids, px = prompt()
    src = "at vit.out keep cls top 54 then recycle 30% into 10; at llm.layer3 keep text top 30 then recycle 9 into 2"
    flops, _, _ = counted_forward(model, src, input_ids=ids, pixel_values=px)
    assert flops == estimate(check(src, SPEC), text_tokens=7, logits="all").flops
