"""`far q [with N text pivots by s]`: DART's pivot-based duplicate removal. Every pivot
(the tokens earlier terms kept, then N text tokens after the image) in turn keeps the
q // pivots tokens least cosine-similar to it. The reference follows DART's
`get_retained_image_token` loop on tensors the plain model hands out (KV cache, hidden
states)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import PolicyError as LangError
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import feature_layer, first_error, sharpen_llm

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id
DART = "at llm.layer2 keep knorm top 4 + far 128 with 4 text pivots by knorm"


def test_parses_formats_and_round_trips():
    policy = parse("at llm.layer2 keep knorm top 4 + far 128 with 4  text pivots by knorm@llm.layer1\n"
                   "at vit.out keep cls top 2 + far 8")
    term = policy.stages[0].action.terms[1]
    assert (term.kind, term.text_pivots, term.pivot_score.name) == ("far", 4, "knorm")
    assert format_policy(policy) == ("at llm.layer2 keep knorm top 4 + far 128 with 4 text pivots by knorm@llm.layer1\n"
                                     "at vit.out keep cls top 2 + far 8\n")
    assert from_yaml(to_yaml(policy)) == policy


@pytest.mark.parametrize("src, message, column", [
    ("at llm.layer2 keep far 8 with 4 image pivots by knorm", "unknown pivots 'image'", 33),
    ("at llm.layer2 keep unique 8 with 4 text pivots by knorm", "text pivots belong to 'far', not to 'unique'", 29),
    ("at llm.layer2 keep far 8 with 0 text pivots by knorm", "'with 0 text pivots' needs a whole number", 31),
    ("at llm.layer2 keep far 8 seed 1", "'seed' belongs to 'random', not to 'far'", 26),
])
def test_misuse_is_a_located_parse_error(src, message, column):
    with pytest.raises(LangError) as err:
        parse(src)
    diag = err.value.diagnostics[0]
    assert message in diag.message and diag.span.column == column


@pytest.mark.parametrize("src, message, column", [
    ("at vit.out keep cls top 4 + far 8 with 4 text pivots by knorm",
     "text pivots are text tokens, which exist only inside the LLM (not at vit.out)", 57),
    ("at llm.layer2 keep far 8", "'far' keeps the tokens least similar to its pivots, but there are none", 20),
    ("at llm.layer2 keep knorm top 4 + far 3 with 4 text pivots by knorm",
     "'far 3' shares 3 tokens among 8 pivots: none for each", 38),
    ("at llm.layer2 keep knorm top 4 + far 8 per region 2x2", "'far' compares every token with every pivot", 40),
    ("at vit.out keep cls top 4 by outliers + far 8", "'far' takes its pivots from the tokens kept before it", 41),
])
def test_misuse_is_a_located_check_error(src, message, column):
    diag = first_error(src, "llava-1.5-7b")
    assert message in diag.message and diag.span.column == column


def test_count_and_cost():
    plan = check("at llm.layer2 keep knorm top 4 + far 130 with 4 text pivots by knorm", "llava-1.5-7b")
    far = plan.stages[0].terms[1]
    assert (far.count, far.per_pivot, far.text_pivots) == (128, 16, 4)  # 130 rounded down to 8 x 16
    assert plan.llm_visual[2] == 132
    with_far = estimate(check(DART, "llava-1.5-7b"))
    plain = estimate(check("at llm.layer2 keep knorm top 132", "llava-1.5-7b"))
    # one [8 pivots, 4096] x [4096, 576 tokens] matrix
    assert with_far.policy.flops - plain.policy.flops == 2 * 8 * 576 * 4096


def _dart_reference(model, ids, px, pivots_img: int, pivots_txt: int, per_pivot: int, mask=None,
                    normed: bool = False) -> list[list[int]]:
    """DART at layer 2: pivots by the L1 norm of layer 1's cached keys (4 image tokens, 4
    text tokens after the image); each pivot in turn (in DART's walk: the Python set of
    their positions, image then text pivots inserted in score order) keeps the per_pivot
    image tokens least cosine-similar to it among those still free; text pivots are not
    kept."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True, output_hidden_states=True)
    keys = out.past_key_values.layers[1].keys  # [B, Hkv, N, dh], RoPE applied
    knorm = keys.abs().sum((1, 3))
    hidden = out.hidden_states[2]  # entering layer 2
    if normed:  # DART's last_layer_state: the model's final norm of it
        with torch.no_grad():
            hidden = model.model.language_model.norm(hidden)
    kept = []
    for b in range(ids.shape[0]):
        img = (ids[b] == IMG).nonzero().flatten().tolist()
        after = [p for p in range(img[-1] + 1, ids.shape[1])]
        top_img = sorted(img, key=lambda p: -float(knorm[b, p]))[:pivots_img]  # topk order
        before = [p for p in range(img[0]) if mask[b, p]]  # padding is never a pivot
        # the question's tokens first; a short question borrows the best text before the image
        top_txt = (sorted(after, key=lambda p: -float(knorm[b, p]))
                   + sorted(before, key=lambda p: -float(knorm[b, p])))[:pivots_txt]
        walk = list(set(top_img + top_txt).copy())  # DART walks this set: CPython's slot order
        free = [p for p in img if p not in top_img]
        kept.append(sorted(top_img + _each_pivot_least_similar(hidden[b], walk, free, per_pivot)))
    return kept


def _each_pivot_least_similar(x: torch.Tensor, pivots: list[int], free: list[int], per_pivot: int) -> list[int]:
    """DART's loop: each pivot in turn takes the per_pivot free rows of x least cosine-
    similar to it (ties: lower index); they are no longer free."""
    chosen = []
    for pivot in pivots:
        sims = F.cosine_similarity(x[pivot][None], x[free], dim=-1)
        picked = [free[i] for i in sorted(range(len(free)), key=lambda i: (float(sims[i]), i))[:per_pivot]]
        chosen += picked
        free = [p for p in free if p not in picked]
    return chosen


def _compiled_kept(model, src: str, **inputs) -> list[list[int]]:
    with vc.apply(src, model), torch.no_grad():
        model(**inputs)
        return [sorted(row.tolist()) for row in vc.kept_tokens(model)["llm.layer2#0"]]


def test_compiled_far_follows_darts_loop():
    model = sharpen_llm(SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval())
    ids = torch.tensor([[5, 6] + [IMG] * 576 + [8, 9, 10, 11, 12, 13, 14]] * 2)
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(6))
    want = _dart_reference(model, ids, px, 4, 4, 16)
    assert _compiled_kept(model, DART, input_ids=ids, pixel_values=px) == want
    assert want[0] != want[1]


def test_a_short_question_borrows_text_pivots_from_before_the_image():
    model = sharpen_llm(SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10] + [IMG] * 576 + [11, 12]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(8))
    want = _dart_reference(model, ids, px, 4, 4, 16)
    assert _compiled_kept(model, DART, input_ids=ids, pixel_values=px) == want
    with vc.apply(DART, model), torch.no_grad(), pytest.raises(vc.CompileError, match="only 3 text tokens"):
        model(input_ids=torch.tensor([[5] + [IMG] * 576 + [11, 12]]), pixel_values=px)


def test_far_in_the_vit_takes_the_kept_tokens_as_pivots():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(7))
    cls, feats = (t[0] for t in feature_layer(model, px, SPEC))
    pivots = sorted(cls.argsort(descending=True)[:3].tolist())
    chosen = _each_pivot_least_similar(feats, pivots, [p for p in range(576) if p not in pivots], 10)
    with vc.apply("at vit.out keep cls top 3 + far 30", model), torch.no_grad():
        model(input_ids=torch.tensor([[5] + [IMG] * 33 + [8]]), pixel_values=px)
        got = [v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist()]
    assert sorted(got) == sorted(pivots + chosen)


def test_text_pivots_are_never_padding_or_vit_scores():
    diag = first_error("at llm.layer2 keep knorm top 4 + far 64 with 4 text pivots by cls@vit.layer1", "llava-1.5-7b")
    assert "'cls@vit.layer1' (a ViT score)" in diag.message and diag.span.column == 63
    model = sharpen_llm(SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval())
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(13))
    # the second prompt has 4 text tokens (2 before the image, 2 after) behind 4 pad rows
    padded = torch.tensor([[5, 6, 7, 8, 9, 10] + [IMG] * 576 + [8, 9], [0, 0, 0, 0, 5, 6] + [IMG] * 576 + [8, 9]])
    mask = (padded != 0).long()
    want = _dart_reference(model, padded, px, 4, 4, 16, mask)
    with vc.apply(DART, model), torch.no_grad():
        model(input_ids=padded, attention_mask=mask, pixel_values=px)
        got = vc.kept_tokens(model)["llm.layer2#0"]
        assert [sorted(row.tolist()) for row in got] == want
        short = padded.clone()
        short[1, 4] = 0  # one more pad row: 3 text tokens are left
        with pytest.raises(vc.CompileError, match="only 3 text tokens"):
            model(input_ids=short, attention_mask=(short != 0).long(), pixel_values=px)


def test_the_listing_names_the_pivots():
    model = SPEC.build(device="meta")
    with vc.apply(DART, model) as compiled:
        assert "far 128 with 4 text pivots by knorm" in vc.compiled(compiled).listing.text()
    assert vc.stage_text(check(DART, SPEC).stages[0]) == ("keep knorm@llm.layer1 top 4 + far 128 with 4 text pivots "
                                                          "by knorm@llm.layer1")


def test_far_norm_compares_the_final_norms_output():
    model = sharpen_llm(SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval())
    with torch.no_grad():  # a non-trivial norm weight, so that normed states compare differently
        model.model.language_model.norm.weight.copy_(torch.rand(SPEC.llm.hidden, generator=torch.Generator()
                                                                .manual_seed(14)) * 2)
    ids = torch.tensor([[5, 6] + [IMG] * 576 + [8, 9, 10, 11, 12, 13, 14]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(15))
    want = _dart_reference(model, ids, px, 4, 4, 16, normed=True)
    assert want != _dart_reference(model, ids, px, 4, 4, 16)
    assert _compiled_kept(model, DART.replace("far", "far(norm)"), input_ids=ids, pixel_values=px) == want
    diag = first_error("at vit.out keep cls top 4 + far(norm) 8", "llava-1.5-7b")
    assert "far(norm) compares hidden states after the LLM's final norm" in diag.message

