"""`text(raters)`: attention averaged over SparseVLM's raters, the question tokens (after
the image) that the visual tokens rate above the mean: rating_t = mean over visual v of
softmax_t(v . t) on the LLM's input embeddings. The reference reads the plain model's
input embeddings and eager attention maps."""

from __future__ import annotations

import math

import torch

import vtdsl.compiler as vc
from vtdsl import ops
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import sharpen_llm

SPEC = get_spec("tiny-llava")
from compiled_run import counted_forward
IMG = SPEC.image_token_id


def test_parses_and_reads_the_raters_query_set():
    policy = parse("at llm.layer3 keep text( raters, top 2 heads) top 300")
    assert format_policy(policy) == "at llm.layer3 keep text(raters, top 2 heads) top 300\n"
    assert from_yaml(to_yaml(policy)) == policy
    (obs,) = check(policy, "llava-1.5-7b").observations
    assert (obs.queries, obs.layer, obs.heads) == ("raters", 2, 2)


def test_cost_is_text_all_plus_the_rating_matrix():
    raters = estimate(check("at llm.layer3 keep text(raters) top 300", "llava-1.5-7b"), text_tokens=40)
    every = estimate(check("at llm.layer3 keep text(all) top 300", "llava-1.5-7b"), text_tokens=40)
    # every text row's attention is computed either way; the raters add 576 visual x 40 text dot products
    assert raters.policy.flops - every.policy.flops == 2 * 576 * 40 * 4096


def _raters_reference(embeds: torch.Tensor, ids: torch.Tensor) -> list[int]:
    img = (ids == IMG).nonzero().flatten().tolist()
    after = list(range(img[-1] + 1, len(ids)))
    rating = []
    for t in after:
        total = 0.0
        for v in img:
            logits = [float(embeds[v] @ embeds[u]) for u in after]
            top = max(logits)
            total += math.exp(logits[after.index(t)] - top) / sum(math.exp(x - top) for x in logits)
        rating.append(total / len(img))
    mean = sum(rating) / len(rating)
    return [t for t, r in zip(after, rating) if r > mean]


def test_raters_match_the_plain_definition():
    gen = torch.Generator().manual_seed(2)
    embeds = torch.randn(30, 8, generator=gen)
    ids = torch.tensor([5, 6] + [IMG] * 20 + [7] * 8)
    want = _raters_reference(embeds, ids)
    img, txt = torch.arange(2, 22), torch.tensor([0, 1] + list(range(22, 30)))
    after = txt > 21
    got = ops.text_raters(embeds[img][None], embeds[txt][None], after[None])[0]
    assert [int(t) for t, r in zip(txt, got) if r] == want and 0 < len(want) < 8


def test_compiled_stage_ranks_by_the_raters_attention_and_counts_its_flops():
    model = sharpen_llm(SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval())
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10, 11, 12, 13, 14, 15]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px, output_attentions=True, output_hidden_states=True)
    raters = _raters_reference(out.hidden_states[0][0], ids[0])
    assert 0 < len(raters) < 8
    att = out.attentions[2][0]  # the stage at llm.layer3 reads layer 2
    scores = att[:, raters][:, :, 3:579].mean(0).mean(0)
    order = scores.argsort(descending=True)
    k = next(k for k in range(100, 200) if float(scores[order[k - 1]] - scores[order[k]]) > 1e-7)
    want = sorted(3 + i for i in order[:k].tolist())
    everyone = att[:, [0, 1, 2, *range(579, 587)]][:, :, 3:579].mean(0).mean(0)
    assert sorted(3 + i for i in everyone.argsort(descending=True)[:k].tolist()) != want  # raters matter
    src = f"at llm.layer3 keep text(raters) top {k}"
    flops, kept, _ = counted_forward(model, src, input_ids=ids, pixel_values=px)
    assert sorted(kept["llm.layer3#0"][0].tolist()) == want
    assert flops == estimate(check(src, "tiny-llava"), text_tokens=11, logits="all").flops


def test_a_prompt_without_an_image_runs_unchanged():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with vc.apply("at llm.layer3 keep text(raters) top 100 then recycle 8 into 2 renumber", model):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)
