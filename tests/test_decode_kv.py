"""Decode-time KV selection (`during decode at llm.layerN attend top K`, DyCoke's dynamic
pruning): the statement's text and YAML forms, its located errors, `generate()` of the
compiled tiny-llava against a plain step-by-step loop written here (no vtdsl), and the
decode FLOPs against a hand formula.

The reference transcribes DyCoke's rule (KD-TAO/DyCoke, commit 96b5de6,
llava/model/language_model/modeling_qwen2.py: `PrunableDynamicCache.dycoke_pruning` /
`update_cache` and the layer loop of `Qwen2Model.forward`): at a decode step, the head
mean of layer N-1's attention row of the new token over the image entries, its top
entries kept with every text entry, and layers N.. attending to those only; the full
cache stays, so each step selects afresh.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import PolicyError, parse
from vtdsl.lang.format import format_policy, format_source
from vtdsl.lang.yaml_form import from_yaml, to_yaml
from vtdsl.models import get_spec

from test_compiler import IMG, build, inputs

SPEC = get_spec("tiny-llava")
LAYER, K, P, STEPS = 3, 8, 0.5, 5
POLICY = f"during decode at llm.layer{LAYER} attend top {K}"
POLICY_P = f"during decode at llm.layer{LAYER} attend top p {P}"


# ------------------------------------------------------------------ language and IR
def test_text_and_yaml_round_trip():
    src = 'policy "d"\nduring decode at llm.layer-2 attend top 12.5%  # DyCoke\nat vit.out keep cls top 50%\n'
    policy = parse(src)
    assert len(policy.decode) == 1 and policy.decode[0].site.index == -2
    assert policy.decode[0].qty.percent and policy.decode[0].qty.value == 12.5
    canon = format_source(src)
    assert canon == ('policy "d"\nat vit.out keep cls top 50%\n'
                     "during decode at llm.layer-2 attend top 12.5%  # DyCoke\n")
    assert format_source(canon) == canon
    assert parse(format_policy(policy)) == policy
    yaml_text = to_yaml(policy)
    assert "decode:\n  - at: llm.layer-2\n    attend: 12.5%\n" in yaml_text
    assert from_yaml(yaml_text) == policy


def test_top_p_forms():
    policy = parse("during decode at llm.layer3 attend top p 0.9")
    (sel,) = policy.decode
    assert sel.qty is None and sel.mass == 0.9
    assert format_policy(policy) == "during decode at llm.layer3 attend top p 0.9\n"
    assert "    attend: p 0.9\n" in to_yaml(policy) and from_yaml(to_yaml(policy)) == policy
    plan = check(policy, SPEC)
    assert (plan.decode[0].mass, plan.decode[0].k) == (0.9, 576)  # the count is per step; its bound
    decode = estimate(plan).to_json()["decode_flops_per_token"]
    assert decode["selected_is_bound"] and decode["selected"] > decode["policy"]  # only the selection's row


@pytest.mark.parametrize("src, where, words", [
    ("during decode at llm.layer3 attend 64", (1, 36), "expected: 'top'"),
    ("during decode llm.layer3 attend top 64", (1, 15), "expected: 'at'"),
    ("during decode at llm.layr3 attend top 64", (1, 18), "did you mean 'llm.layer3'"),
    ("during decode at llm.layer3 attend top q 0.9", (1, 40), "or 'p' and a share such as p 0.9"),
    ("during decode at llm.layer3 attend top p 1.5", (1, 42), "a share of the attention in (0, 1], got 1.5"),
    ("at vit.out keep cls top p", (1, 25), "unexpected word 'p'"),
])
def test_syntax_errors_are_located(src, where, words):
    with pytest.raises(PolicyError) as exc:
        parse(src)
    d = exc.value.diagnostics[0]
    assert (d.span.line, d.span.column) == where
    assert words in str(exc.value)


def test_yaml_errors_are_located():
    with pytest.raises(PolicyError) as exc:
        from_yaml("decode:\n  - at: llm.layer3\n", "p.yaml")
    assert "p.yaml:2:5: error: a decode stage needs 'attend'" in str(exc.value)


@pytest.mark.parametrize("src, column, words", [
    ("during decode at vit.layer3 attend top 8", 18, "acts in the LLM's attention"),
    ("during decode at llm.layer0 attend top 8", 18, "no earlier layer"),
    ("during decode at llm.layer32 attend top 8", 18, "out of range"),
    ("during decode at llm.layer3 attend top 577", 40, "than the 576 the cache holds"),
])
def test_ir_errors_are_located(src, column, words):
    with pytest.raises(PolicyError) as exc:
        check(parse(src), SPEC)
    d = exc.value.diagnostics[0]
    assert (d.span.line, d.span.column) == (1, column) and words in d.message


def test_ir_counts_after_prefill_stages():
    plan = check(parse("at vit.out keep cls top 100\nduring decode at llm.layer-1 attend top 10%"), SPEC)
    (sel,) = plan.decode
    assert (sel.layer, sel.visual, sel.k) == (31, 100, 10)
    assert plan.llm_visual == [100] * 32  # prefill counts untouched
    with pytest.raises(PolicyError, match="needs every LLM prefill stage before that layer"):
        check(parse("at llm.layer3 keep text top 50%\n" + POLICY), SPEC)
    with pytest.raises(PolicyError, match="the stage at llm.layer4 changes"):
        check(parse("every 2 layers from llm.layer2 to llm.layer8 keep text top 90%\n" + POLICY), SPEC)
    (sel,) = check(parse("at llm.layer2 keep text top 50%\n" + POLICY), SPEC).decode
    assert (sel.visual, sel.k) == (288, K)
    with pytest.raises(PolicyError, match="at most one decode stage"):
        check(parse(POLICY + "\n" + POLICY), SPEC)


# ------------------------------------------------------------------ the compiled model
def _mask_hook(pruned: list[torch.Tensor]):
    """Block the columns `pruned[b]` of sample b in a decoder layer's 4-D mask."""
    def hook(module, args, kwargs):
        m = kwargs["attention_mask"]
        n = kwargs["past_key_values" if "past_key_values" in kwargs else "cache"].get_seq_length(0)
        b = len(pruned)
        m = torch.zeros(b, 1, 1, n) if m is None else m.expand(b, *m.shape[1:]).clone()
        for i, cols in enumerate(pruned):
            m[i, :, :, cols] = torch.finfo(m.dtype).min
        kwargs["attention_mask"] = m
        return args, kwargs
    return hook


def _top_k(row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The image rows left out under `top K`: all but the K most attended."""
    order = torch.argsort(row[rows], descending=True)
    assert row[rows[order[K - 1]]] - row[rows[order[K]]] > 1e-7, "near tie"
    return rows[order[K:]]


def _top_p(row: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The image rows left out under `top p P`: the most attended are kept until their
    share of the image rows' attention reaches P."""
    values = row[rows]
    order = torch.argsort(values, descending=True)
    shares = torch.cumsum(values[order], 0) / values.sum()
    count = int((shares < P).sum()) + 1
    assert shares[count - 1] - P > 1e-6 and (count == 1 or P - shares[count - 2] > 1e-6), "near tie"
    return rows[order[count:]]


def _run(model, masks: list[tuple[int, list[torch.Tensor]]], **kw):
    """One forward of the plain model with `cols[b]` masked from LLM layer `start` on, for
    each (start, cols) of `masks`."""
    layers = model.model.language_model.layers
    hooks = [layers[j].register_forward_pre_hook(_mask_hook(cols), with_kwargs=True)
             for start, cols in masks for j in range(start, len(layers))]
    try:
        with torch.no_grad():
            return model(**kw)
    finally:
        for h in hooks:
            h.remove()


def _reference(model, ids, mask, px, steps: int, leave_out, prefill_cut=None) -> list[torch.Tensor]:
    """Greedy logits per step of the plain eager model, DyCoke's decode rule by hand.
    `prefill_cut`: (layer, image rows pruned per sample) of a prefill LLM stage, masked
    from that layer on at every step, its rows no candidates for the decode rule."""
    cut = [prefill_cut] if prefill_cut else []
    image = ids == IMG
    for _, cols in cut:
        for b, c in enumerate(cols):
            image[b, c] = False
    out = _run(model, cut, input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    for _ in range(steps - 1):
        tok = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        # layer N-1's row on a copy of the cache: the decode rule masks nothing before layer N
        probe = _run(model, cut, input_ids=tok, attention_mask=mask, cache=copy.deepcopy(cache),
                     output_attentions=True)
        row = probe.attentions[LAYER - 1][:, :, -1, :].mean(1)
        pruned = [leave_out(row[b], image[b].nonzero().flatten()) for b in range(ids.shape[0])]
        step = _run(model, cut + [(LAYER, pruned)], input_ids=tok, attention_mask=mask, cache=cache)
        logits.append(step.logits[:, -1])
    return logits


RULES = {"top-k": (POLICY, _top_k), "top-p": (POLICY_P, _top_p)}


@pytest.fixture(scope="module")
def references():
    ids, mask, px = inputs(2)
    model = build("eager")
    return {name: _reference(model, ids, mask, px, STEPS, rule) for name, (_, rule) in RULES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_equals_masked_reference(attn, rule, references):
    reference = references[rule]
    model = build(attn)
    ids, mask, px = inputs(2)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=STEPS, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**kw)
        with vc.apply(RULES[rule][0], model):
            got = model.generate(**kw)
        again = model.generate(**kw)
    want = torch.stack([r.argmax(-1) for r in reference], 1)
    assert torch.equal(got.sequences[:, ids.shape[1]:], want)
    for step, (a, b) in enumerate(zip(got.scores, reference)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), step
    # prefill untouched; the selection changes the later steps
    assert torch.allclose(got.scores[0], plain.scores[0], atol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores[1:], plain.scores[1:])) > 1e-2
    # uncompiled: the plain model's logits again
    for a, b in zip(again.scores, plain.scores):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_after_an_llm_prefill_stage():
    """FastV at llm.layer2 (its 288 kept image rows by hand, plain_refs) then the decode
    rule at llm.layer3 over those rows only; the cache at layers 2.. holds only them."""
    from plain_refs import last_query_attention, prune_to_top

    ids, mask, px = inputs(2)
    model = build("eager")
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=px)
    _, fastv_pruned = prune_to_top(last_query_attention(model, batch, 1), ids, IMG, 288)
    want = _reference(model, ids, mask, px, STEPS, _top_k, prefill_cut=(2, fastv_pruned))
    kw = dict(batch, max_new_tokens=STEPS, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), vc.apply("at llm.layer2 keep text top 50%\n" + POLICY, model):
        got = model.generate(**kw)
    assert torch.equal(got.sequences[:, ids.shape[1]:], torch.stack([r.argmax(-1) for r in want], 1))
    for step, (a, b) in enumerate(zip(got.scores, want)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), step


# ------------------------------------------------------------------ cost
def test_decode_flops_with_and_without_the_selection():
    plan = check(parse(POLICY), SPEC)
    report = estimate(plan, text_tokens=64, decode_context=10)
    t = SPEC.llm
    d, qd, kvd, L = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim, t.layers
    T, V, c = 64, 576, 10
    mlp = SPEC.llm.mlp_matmuls
    lin = 2 * (2 * d * qd + 2 * d * kvd + mlp * d * t.ffn)
    full = L * lin + sum(4 * qd * (T + V + c + 1) for _ in range(L)) + 2 * d * SPEC.vocab_size
    selected = (L * lin + sum(4 * qd * (T + V + c + 1) for _ in range(LAYER))
                + sum(4 * qd * (T + K + c + 1) for _ in range(LAYER, L)) + 2 * d * SPEC.vocab_size
                + 2 * qd * (T + V + c + 1))  # the selection's own q.K row at layer N-1
    out = report.to_json()["decode_flops_per_token"]
    assert out["baseline"] == full and out["policy"] == full
    assert out["selected"] == selected
    assert out["selected_ratio"] == pytest.approx(selected / full)


def test_check_cli_reports_both_figures(tmp_path):
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    path = tmp_path / "d.vt"
    path.write_text("during decode at llm.layer3 attend top 10%\n")
    runner = CliRunner()
    out = runner.invoke(main, ["check", str(path), "--model", "tiny-llava", "--json"])
    assert out.exit_code == 0, out.output
    decode = json.loads(out.output)["decode_flops_per_token"]
    assert decode["selection"] == "during decode at llm.layer3 attend top 58"  # 10% of 576, half up
    assert decode["selected"] < decode["policy"] == decode["baseline"]
    text = runner.invoke(main, ["check", str(path), "--model", "tiny-llava"])
    assert "with 'during decode at llm.layer3 attend top 58' /" in text.output
    path.write_text("during decode at llm.layer0 attend top 10%\n")
    bad = runner.invoke(main, ["check", str(path), "--model", "tiny-llava"])
    assert bad.exit_code == 2 and f"{path}:1:18: error: a decode stage at llm.layer0" in bad.output
