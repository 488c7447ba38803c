"""`top H heads`: the mean over the H heads that give the visual tokens the most attention
(SparseVLM v2's head selection), against eager attention maps of the plain model."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import PolicyError as LangError
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import first_error, peaked

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


def test_parses_formats_and_round_trips():
    policy = parse("at vit.out keep cls( top  3 heads ) top 4\nat llm.layer2 keep text(all, top 2 heads) top 3")
    assert policy.stages[0].action.terms[0].score.heads == 3
    assert format_policy(policy) == ("at vit.out keep cls(top 3 heads) top 4\n"
                                     "at llm.layer2 keep text(all, top 2 heads) top 3\n")
    assert from_yaml(to_yaml(policy)) == policy


@pytest.mark.parametrize("src, message, column", [
    ("at vit.out keep cls(top 0 heads) top 4", "'top 0 heads' needs a whole number of heads", 25),
    ("at vit.out keep cls(max, top 2 heads) top 4", "one head aggregate per score", 26),
    ("at vit.out keep vnorm(top 2 heads) top 4", "'vnorm' reads no attention heads", 23),
])
def test_misuse_is_a_located_parse_error(src, message, column):
    with pytest.raises(LangError) as err:
        parse(src)
    (diag,) = err.value.diagnostics
    assert message in diag.message and diag.span.column == column


def test_more_heads_than_the_tower_has_is_located():
    diag = first_error("at vit.out keep cls top 4 + cls(top 17 heads) top 2", "llava-1.5-7b")
    assert diag.message == "'top 17 heads' asks for more heads than llava-1.5-7b's ViT has (16)"
    assert (diag.span.line, diag.span.column) == (1, 29)
    assert check("at llm.layer2 keep text(all, top 32 heads) top 3", "llava-1.5-7b").observations[0].heads == 32


def test_costs_what_the_mean_costs():
    top = estimate(check("at llm.layer2 keep text(all, top 14 heads) top 64", "llava-1.5-7b"))
    mean = estimate(check("at llm.layer2 keep text(all) top 64", "llava-1.5-7b"))
    assert top.policy.flops == mean.policy.flops  # the same q.k rows; ranking heads is a sum


def _top_heads_reference(probs: torch.Tensor, rows: list[int], cols: list[int], h: int) -> torch.Tensor:
    """Plain loop: per head, its total attention from `rows` to `cols`; the h largest
    heads averaged, then the rows averaged. ``probs [H, N, N]`` -> ``[len(cols)]``."""
    masses = [float(probs[head][rows][:, cols].sum()) for head in range(probs.shape[0])]
    chosen = sorted(range(len(masses)), key=lambda i: -masses[i])[:h]
    assert len(set(round(m, 6) for m in masses)) == len(masses), "tied head masses"
    return torch.stack([probs[head][rows][:, cols] for head in chosen]).mean(0).mean(0)


def _top_with_gap(rows: list[torch.Tensor], lo: int) -> tuple[int, list[list[int]]]:
    """The smallest k >= lo at which every row's k-th and (k+1)-th values differ clearly,
    and each row's top k (ascending): an unambiguous reference."""
    orders = [r.argsort(descending=True) for r in rows]
    k = next(k for k in range(lo, len(rows[0]) - 1)
             if all(float(r[o[k - 1]] - r[o[k]]) > 1e-6 for r, o in zip(rows, orders)))
    return k, [sorted(o[:k].tolist()) for o in orders]


def test_compiled_top_heads_match_eager_attention_per_sample():
    model = peaked(SPEC)
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10, 11]] * 2)
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        vit_att = model.model.vision_tower(px, output_attentions=True).attentions
        llm_att = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                        output_attentions=True).attentions
    text_rows = [0, 1, 2, 579, 580, 581, 582]
    img = list(range(3, 579))
    k_llm, want_llm = _top_with_gap([_top_heads_reference(llm_att[1][b], text_rows, img, 2) for b in range(2)], 30)
    want_llm = [[img[i] for i in row] for row in want_llm]
    k_vit, want_vit = _top_with_gap(
        [_top_heads_reference(vit_att[SPEC.feature_layer_index][b], [0], list(range(1, 577)), 2) for b in range(2)], 30)
    # the option matters: the plain head mean keeps other tokens
    mean_llm = llm_att[1][0][:, text_rows][:, :, img].mean(0).mean(0)
    assert sorted(img[i] for i in mean_llm.argsort(descending=True)[:k_llm].tolist()) != want_llm[0]
    with vc.apply(f"at vit.out keep cls(top 2 heads) top {k_vit}", model), torch.no_grad():
        model(input_ids=torch.tensor([[5] + [IMG] * k_vit + [8]] * 2), pixel_values=px)
        kept_vit = vc.kept_tokens(model)["vit.out#0"]
    assert [sorted(v - 1 for v in row.tolist()) for row in kept_vit] == want_vit
    with vc.apply(f"at llm.layer2 keep text(all, top 2 heads) top {k_llm}", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept_llm = vc.kept_tokens(model)["llm.layer2#0"]
    assert [sorted(row.tolist()) for row in kept_llm] == want_llm
