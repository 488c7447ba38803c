"""Adaptive counts: `top N by outliers` (PruMerge's IQR rule, at most N) and `top N by
entropy(score) over L layers` (FlowCut's rule, at least N). References: numpy percentiles,
FlowCut's formula written out, a hand-run CLIP layer loop, and the same policy compiled
with the count the reference gives as a fixed number."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vtdsl.compiler as vc
from vtdsl import ops
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import PolicyError as LangError
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import clip_cls_scores, first_error, generate_on_features, last_query_attention, sharpen_llm

SPEC = get_spec("tiny-llava")
from compiled_run import counted_forward
IMG = SPEC.image_token_id
FLOWCUT = ("at vit.layer2 keep cls top 64 by entropy(cls) over 20 layers\n"
           "at vit.layer4 keep cls top 64 by entropy(cls) over 18 layers\n"
           "at vit.layer22 keep cls top 64 by entropy(cls) over 2 layers\n")


def _iqr_outliers(row) -> int:
    """PruMerge's count by numpy: scores above Q3 + 1.5 (Q3 - Q1)."""
    q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
    return int((row > q3 + 1.5 * (q3 - q1)).sum())


# ---------------------------------------------------------------- language
def test_parses_formats_and_round_trips():
    policy = parse("at vit.out keep cls top 25%  by outliers then absorb 32\n"
                   "at llm.layer2 keep text top 8 by entropy( text@llm.layer1 ) over 1 layer")
    term = policy.stages[1].action.terms[0]
    assert (term.adaptive.kind, term.adaptive.steps, term.adaptive.score.name) == ("entropy", 1, "text")
    assert format_policy(policy) == ("at vit.out keep cls top 25% by outliers then absorb 32\n"
                                     "at llm.layer2 keep text top 8 by entropy(text@llm.layer1) over 1 layer\n")
    assert from_yaml(to_yaml(policy)) == policy


@pytest.mark.parametrize("src, message, column", [
    ("at vit.out keep cls top 8 by entropy(cls) over 0 layers", "'over 0 layers' needs a whole number of layers", 48),
    ("at vit.out keep cls top 8 by entropy(cls) over 2.5 layers", "'over 2.5 layers' needs a whole number", 48),
    ("at vit.out keep cls top 8 by entropy over 2 layers", "unexpected 'over'", 38),
    ("at vit.out keep cls top 8 by median", "unexpected word 'median'", 30),
])
def test_misuse_is_a_located_parse_error(src, message, column):
    with pytest.raises(LangError) as err:
        parse(src)
    diag = err.value.diagnostics[0]
    assert message in diag.message and diag.span.column == column


# ---------------------------------------------------------------- IR and cost
def test_bounds_flow_through_the_plan():
    plan = check("at vit.out keep cls top 25% by outliers then absorb 32", "llava-1.5-7b")
    (stage,) = plan.stages
    # IQR outliers lie above Q3, so at most 144 of 576; one more token for the absorbed ones
    assert (stage.tokens_in, stage.tokens_out, stage.fewest_out) == (576, 145, 2)
    assert plan.visual_tokens_to_llm == 145
    flow = check(FLOWCUT, "llava-1.5-7b")
    # the entropy rule may remove nothing (flat attention) and never leaves fewer than 64
    assert [(s.tokens_in, s.fewest_in, s.tokens_out, s.fewest_out) for s in flow.stages] == [
        (576, 576, 576, 64), (576, 64, 576, 64), (576, 64, 576, 64)]
    assert [o.layer for o in flow.observations] == [1, 3, 21]


def test_the_cost_model_charges_the_bound():
    adaptive = estimate(check("at vit.out keep cls top 25% by outliers then absorb 32", "llava-1.5-7b"))
    fixed = estimate(check("at vit.out keep cls top 144 then absorb 32", "llava-1.5-7b"))
    assert adaptive.policy.flops == fixed.policy.flops and adaptive.policy.kv_bytes == fixed.policy.kv_bytes
    # FlowCut's cuts may all remove nothing: only the scores' cost is added to the base
    flow = estimate(check(FLOWCUT, "llava-1.5-7b"))
    scores_only = estimate(check("at vit.layer2 keep cls top 576\nat vit.layer4 keep cls top 576\n"
                                 "at vit.layer22 keep cls top 576", "llava-1.5-7b"))
    assert flow.policy.flops == scores_only.policy.flops


@pytest.mark.parametrize("src, spec, message, line, column", [
    ("at vit.out keep cls top 64 by outliers\nat llm.layer2 keep text top 50%", "llava-1.5-7b",
     "'50%' is a share of the tokens entering this stage, whose count varies per image after the adaptive count "
     "at vit.out", 2, 29),
    ("at vit.out keep cls top 64 by outliers\nat llm.layer2 keep text top 2", "llava-1.5-7b",
     "'top 2' asks for 2 tokens, but only 1 remain (as few as 1 enter this stage at llm.layer2)", 2, 29),
    ("at vit.out keep cls top 64 by outliers + buffers", "llava-1.5-7b",
     "'buffers' sizes itself by the tokens kept before it, whose count varies per image here", 1, 42),
    ("at vit.out keep cls top 64 by outliers per region 2x2", "llava-1.5-7b",
     "a count decided per image ('by ...') cannot also be split over regions", 1, 40),
])
def test_misuse_is_a_located_check_error(src, spec, message, line, column):
    diag = first_error(src, spec)
    assert diag.message == message
    assert (diag.span.line, diag.span.column) == (line, column)


# ---------------------------------------------------------------- ops
def test_outlier_count_is_the_iqr_rule():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 200, generator=gen) ** torch.tensor([[2.0], [8.0], [16.0]])  # right tails
    want = [_iqr_outliers(row) for row in scores.numpy()]
    assert len(set(want)) == 3
    assert ops.outlier_count(scores, 200) == max(want)  # the batch keeps its largest count
    assert ops.outlier_count(scores, 5) == 5
    assert ops.outlier_count(torch.ones(2, 50), 10) == 1  # no outlier: the best token


def test_entropy_count_is_flowcuts_formula():
    gen = torch.Generator().manual_seed(1)
    attn = torch.softmax(torch.randn(2, 300, generator=gen) * torch.tensor([[1.0], [3.0]]), dim=1)
    removed = []
    for row in attn.tolist():
        h = -sum(p * math.log(p) for p in row) / math.log(len(row))
        removed.append(round((300 - 40) / math.sqrt(6) * (1 - h * h)))
    assert removed[0] != removed[1]
    assert ops.entropy_count(attn, 300, 40, 6) == 300 - max(removed)
    assert ops.entropy_count(torch.ones(1, 300), 300, 40, 6) == 300  # flat: nothing goes
    assert ops.entropy_count(torch.eye(300)[:1], 300, 40, 1) == 40  # all on one token, last layer: to N


# ---------------------------------------------------------------- compiled
@pytest.fixture(scope="module")
def peaked():
    """Random weights give near-flat attention (entropy ~1, few outliers): sharpen it."""
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return sharpen_llm(model)


PX = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(3))


def _prompt(image_tokens: int) -> torch.Tensor:
    return torch.tensor([[5, 6, 7] + [IMG] * image_tokens + [8, 9, 10]] * 2)


def _run(model, policy: str, image_tokens: int, new_tokens: int = 3):
    ids = _prompt(image_tokens)
    with vc.apply(policy, model), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=PX).logits
        kept = {k: v.clone() for k, v in vc.kept_tokens(model).items()}
        counts = vc.kept_counts(model)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=PX,
                             max_new_tokens=new_tokens, do_sample=False)
    return logits, kept, counts, out[:, ids.shape[1]:]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    order = scores.argsort(descending=True)
    assert float(scores[order[k - 1]] - scores[order[k]]) > 1e-7, "near tie"
    return sorted(order[:k].tolist())


def test_outliers_at_vit_out_keep_the_iqr_count_and_run_like_the_fixed_count(peaked):
    with torch.no_grad():
        att = peaked.model.vision_tower(PX, output_attentions=True).attentions[SPEC.feature_layer_index]
    cls = att[:, :, 0, 1:].mean(1)  # [2, 576]
    counts = [_iqr_outliers(row) for row in cls.numpy()]
    k = max(counts)
    assert 1 < k < 144 and counts[0] != counts[1]
    logits, kept, got, gen = _run(peaked, "at vit.out keep cls top 25% by outliers then absorb 8", 145)
    assert got["vit"]["vit.out#0"] == (576, k + 1)
    assert [sorted(v - 1 for v in row[:k].tolist()) for row in kept["vit.out#0"]] == [_top(c, k) for c in cls]
    # the prompt had room for 145; the LLM saw exactly the k + 1 tokens, contiguous positions
    want_logits, _, _, want_gen = _run(peaked, f"at vit.out keep cls top {k} then absorb 8", k + 1)
    assert logits.shape[1] == want_logits.shape[1] == 6 + k + 1
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, want_gen)


def _flowcut_reference(model, px, cuts: dict[int, tuple[int, int]], target: int) -> dict[int, list[list[int]]]:
    """FlowCut's loop by hand: before ViT layer i in `cuts` (i -> steps L), the CLS
    attention of layer i-1 (on its input) decides the count — the batch removes its largest
    round((n - target)(1 - H^2)/sqrt(L)) — and ranks the patches. Returns the kept patch
    indices (0-based, original) of each cut."""
    tower = model.model.vision_tower
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(px))
        ids = torch.arange(576)[None].expand(px.shape[0], -1)
        out = {}
        for i, layer in enumerate(tower.encoder.layers[: SPEC.feature_layer_index + 1]):
            if i in cuts:
                cls = clip_cls_scores(tower.encoder.layers[i - 1], h_prev)
                n, steps = cls.shape[1], cuts[i]
                p = cls / cls.sum(1, keepdim=True)
                ent = -(p * p.log()).sum(1) / math.log(n)
                removed = max(int(torch.round((n - target) / math.sqrt(steps) * (1 - ent[b] ** 2)))
                              for b in range(len(ent)))
                k = max(n - removed, target)
                keep = cls.topk(k, dim=1).indices.sort(dim=1).values
                h = torch.cat([h[:, :1], h[:, 1:].gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))], 1)
                ids = ids.gather(1, keep)
                out[i] = [sorted(r) for r in ids.tolist()]
            h_prev = h
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
    return out


def test_entropy_cuts_in_the_vit_follow_flowcuts_loop(peaked):
    want = _flowcut_reference(peaked, PX, {2: 20, 4: 18, 22: 2}, 64)
    sizes = [len(want[i][0]) for i in (2, 4, 22)]
    assert 576 > sizes[0] > sizes[1] > sizes[2] > 64  # every cut removed some, none hit the floor
    logits, kept, got, gen = _run(peaked, FLOWCUT, 576)
    for index, layer in enumerate((2, 4, 22)):
        assert [sorted(v - 1 for v in row.tolist()) for row in kept[f"vit.layer{layer}#{index}"]] == want[layer]
    # the features vary (the last cut is adaptive): trimmed at the LLM input, which runs as
    # if the prompt had held exactly that many image tokens
    fixed = ("at vit.layer2 keep cls top {}\nat vit.layer4 keep cls top {}\nat vit.layer22 keep cls top {}"
             .format(*sizes))
    want_logits, _, _, want_gen = _run(peaked, fixed, sizes[2])
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, want_gen)


def test_outliers_at_an_llm_layer_read_the_last_query(peaked):
    ids = _prompt(576)
    scores = last_query_attention(peaked, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                           "pixel_values": PX}, 1)[:, 3:579]
    counts = [_iqr_outliers(row) for row in scores.numpy()]
    k = max(counts)
    assert 1 < k < 100
    _logits, kept, got, _gen = _run(peaked, "at llm.layer2 keep text top 100 by outliers", 576)
    assert got["llm"]["llm.layer2#0"] == (576, k)
    assert [sorted(r.tolist()) for r in kept["llm.layer2#0"]] == [[3 + i for i in _top(s, k)] for s in scores]


def test_check_shows_the_range_of_counts(tmp_path):
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    path = tmp_path / "p.vt"
    path.write_text("at vit.out keep cls top 25% by outliers then absorb 32\n")
    result = CliRunner().invoke(main, ["check", str(path), "--model", "llava-1.5-7b"])
    assert result.exit_code == 0 and "576 -> 2..145" in result.output
    data = json.loads(CliRunner().invoke(main, ["check", str(path), "--model", "llava-1.5-7b", "--json"]).output)
    assert data["stages"] == [{"site": "vit.out", "action": "keep", "tokens_in": 576, "tokens_out": 145,
                               "fewest_in": 576, "fewest_out": 2}]
    assert data["visual_tokens_to_llm"] == 145  # the bound the cost figures use


def test_outliers_on_llava_next_give_every_crop_the_calls_count():
    """LLaVA-NeXT: the crops of a call share one count (the largest over all crops), the
    pruned crops are concatenated, and generate() runs as the plain model does on a prompt
    of exactly those features."""
    spec = get_spec("tiny-llava-next")
    model = spec.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.vision_tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    sharpen_llm(model)
    img, n_img = spec.image_token_id, spec.image_tokens  # 88: base + 2x2 crops, unpadded, newlines
    ids = torch.tensor([[5, 6, 7] + [img] * n_img + [8, 9, 10]] * 2)
    px = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    sizes = torch.tensor([[112, 112]] * 2)
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(px.reshape(10, 3, 56, 56), output_attentions=True, output_hidden_states=True)
    cls = out.attentions[spec.feature_layer_index][:, :, 0, 1:].mean(1)  # [10 crops, 16]
    counts = [_iqr_outliers(row) for row in cls.numpy()]
    k = min(max(counts), 4)  # the bound: 25% of 16 patches
    assert 1 < k and len(set(counts)) > 1
    feats = out.hidden_states[spec.feature_layer_index + 1][:, 1:]
    keep = [_top(c, k) for c in cls]
    with torch.no_grad():
        want = model.model.multi_modal_projector(torch.stack([feats[c, keep[c]] for c in range(10)]))
    want = want.reshape(2, 5 * k, -1)
    with vc.apply("at vit.out keep cls top 25% by outliers", model) as compiled:
        assert vc.image_token_count(compiled) == 5 * 4  # the prompt keeps room for the bound
        with torch.no_grad():
            gen = compiled.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                                    image_sizes=sizes, max_new_tokens=4, do_sample=False)
        assert vc.kept_counts(compiled)["vit"]["vit.out#0"] == (16, k)
    short = vc.rewrite_inputs(ids, torch.ones_like(ids), image_token_id=img, from_count=n_img, to_count=5 * k)
    assert torch.equal(gen[:, -4:], generate_on_features(model, short["input_ids"], short["attention_mask"], img,
                                                         want, 4))


def test_counted_flops_are_those_of_the_count_the_run_kept(peaked):
    """FlopCounterMode on the compiled adaptive model = the cost model's figure for the
    same policy written with the count this image got: the padding costs nothing."""
    ids = torch.tensor([[5, 6, 7] + [IMG] * 145 + [8, 9, 10]])
    flops, _, counts = counted_forward(peaked, "at vit.out keep cls top 25% by outliers then absorb 8",
                                       input_ids=ids, pixel_values=PX[:1])
    k = counts["vit"]["vit.out#0"][1] - 1
    fixed = estimate(check(f"at vit.out keep cls top {k} then absorb 8", "tiny-llava"), text_tokens=6, logits="all")
    bound = estimate(check("at vit.out keep cls top 25% by outliers then absorb 8", "tiny-llava"), text_tokens=6,
                     logits="all")
    assert flops == fixed.flops < bound.flops


def test_review_fixes_bounds_percentages_and_flat_weights():
    # two adaptive terms never bound the stage above what enters it
    plan = check("at vit.out keep cls top 10 by outliers + cls top 20 by entropy(cls) over 1 layers", "llava-1.5-7b")
    assert (plan.stages[0].fewest_out, plan.stages[0].tokens_out) == (21, 576)
    # a share of a varying number of dropped tokens is refused at the quantity
    diag = first_error("at vit.out keep cls top 64 by outliers then recycle 50% into 10", "llava-1.5-7b")
    assert diag.code == "adaptive" and diag.span.column == 53
    # an outlier term only needs its one sure token: a schedule of them checks
    plan = check("every 2 layers from llm.layer2 to llm.layer8 keep text top 64 by outliers", "llava-1.5-7b")
    assert [(s.fewest_in, s.tokens_in, s.tokens_out) for s in plan.stages] == [
        (576, 576, 64), (1, 64, 64), (1, 64, 64), (1, 64, 64)]
    # nothing to weigh (zero or negative weights): flat, so nothing is removed
    assert ops.entropy_count(torch.zeros(1, 50), 50, 10, 1) == 50
    assert ops.entropy_count(torch.tensor([[-1.0, 2.0, 0.0, 0.0]]), 4, 1, 1) == 1  # all on one token


def test_merge_rest_is_charged_for_the_most_tokens_it_can_merge():
    from vtdsl.cost.model import stage_flops
    from vtdsl.cost.model import _Constants  # noqa: PLC2701 - the per-stage figure is what is tested

    plan = check("at vit.out keep cls top 64 by outliers then merge rest into 10", "llava-1.5-7b")
    # at most 575 tokens are left over (one outlier kept): 565 of them join the 10 targets
    assert stage_flops(_Constants(plan.spec), plan.stages[0]) == 2 * 565 * 10 * 1024


def _flowcut_scores(layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's per-layer score of ViT `layer` on its input h, by hand: (CLS attention /
    its sum + CLS-value softmax / its sum) x L1 norm of the head-mean value; and the CLS
    attention. Patch columns, ``[B, n]`` each."""
    attn = layer.self_attn
    heads, dh = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(h)
    b, n = x.shape[:2]
    q, k, v = (p(x).view(b, n, heads, dh).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    cls = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / dh**0.5, dim=-1).mean(1)[:, 0, 1:]
    sem = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(1)[:, 0, 1:]
    vnorm = v.mean(1).abs().sum(-1)[:, 1:]
    return (cls / cls.sum(1, keepdim=True) + sem / sem.sum(1, keepdim=True)) * vnorm, cls


def test_flowcuts_ema_ranking_follows_its_loop(peaked):
    """`prod(sum(share(cls), share(vsim)), vnorm)@vit.layer0..K ema`: FlowCut's cumulative
    score, updated after every layer (0.5 old + 0.5 new, each layer's score normalised over
    the tokens present then), ranks every cut; counts by the entropy rule."""
    score = "prod(sum(share(cls), share(vsim)), vnorm)"
    policy = (f"at vit.layer2 keep {score}@vit.layer0..1 ema top 64 by entropy(cls) over 4 layers\n"
              f"at vit.layer4 keep {score}@vit.layer0..3 ema top 64 by entropy(cls) over 2 layers\n"
              f"at vit.layer6 keep {score}@vit.layer0..5 ema top 64")
    tower = peaked.model.vision_tower
    want = {}
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(PX))
        ids = torch.arange(576)[None].expand(2, -1)
        cum = None
        for i, layer in enumerate(tower.encoder.layers[:6]):
            s, cls = _flowcut_scores(layer, h)
            cum = s if cum is None else 0.5 * cum + 0.5 * s
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            if i in (1, 3, 5):
                rpl = 5 - i
                n = cls.shape[1]
                if rpl:
                    p = cls / cls.sum(1, keepdim=True)
                    ent = -(p * p.log()).sum(1) / math.log(n)
                    removed = max(int(torch.round((n - 64) / math.sqrt(rpl) * (1 - e**2))) for e in ent)
                    k = max(n - removed, 64)
                else:
                    k = 64
                keep = cum.topk(k, dim=1).indices.sort(dim=1).values
                h = torch.cat([h[:, :1], h[:, 1:].gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))], 1)
                cum, ids = cum.gather(1, keep), ids.gather(1, keep)
                want[i + 1] = [sorted(r) for r in ids.tolist()]
    assert 576 > len(want[2][0]) > len(want[4][0]) > 64
    with vc.apply(policy, peaked), torch.no_grad():
        peaked(input_ids=_prompt(64), pixel_values=PX)
        got = vc.kept_tokens(peaked)
    for index, layer in enumerate((2, 4, 6)):
        assert [sorted(v - 1 for v in row.tolist()) for row in got[f"vit.layer{layer}#{index}"]] == want[layer]
    # the running average matters: each layer's own score keeps other tokens
    plain = policy.replace("@vit.layer0..1 ema", "").replace("@vit.layer0..3 ema", "").replace("@vit.layer0..5 ema", "")
    with vc.apply(plain, peaked), torch.no_grad():
        peaked(input_ids=_prompt(64), pixel_values=PX)
        assert sorted(vc.kept_tokens(peaked)["vit.layer6#2"][0].tolist()) != [v + 1 for v in want[6][0]]
