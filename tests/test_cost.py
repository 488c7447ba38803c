"""Cost model: the hf convention against FlopCounterMode, FastV's formula, KV bytes,
decode FLOPs, scorer extras, budgets."""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtdsl.cost import estimate, estimate_counts, parse_budget, verdicts
from vtdsl.ir import check
from vtdsl.ir.plan import Observation, Plan, ResolvedScore, ResolvedSite, ResolvedStage, ResolvedTerm
from vtdsl.lang.ast import Budget, Policy
from vtdsl.lang import parse_file
from vtdsl.lang.errors import PolicyError
from vtdsl.models import get_spec, spec_from_config
from vtdsl.ops.rest.merge import Merged

ROOT = "LlavaForConditionalGeneration"
PART_MODULES = {
    "vit": f"{ROOT}.model.vision_tower",
    "projector": f"{ROOT}.model.multi_modal_projector",
    "llm": f"{ROOT}.model.language_model",
    "lm_head": f"{ROOT}.lm_head",
}


ROOT_DIR = Path(__file__).resolve().parent.parent


def rel_err(a, b):
    return abs(a - b) / max(abs(b), 1)


@contextlib.contextmanager
def placeholder_check_off():
    """On meta tensors LLaVA's image-token count check calls .item(); skip only that."""
    with mock.patch("transformers.models.llava.modeling_llava.torch_compilable_check", lambda *a, **k: None):
        yield


def count(fn):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    per_module = counter.get_flop_counts()
    by_part = {part: sum(per_module.get(name, {}).values()) for part, name in PART_MODULES.items()}
    return counter.get_total_flops(), by_part


def full_forward(spec, model, text_tokens, logits_to_keep, device="meta"):
    ids = torch.cat(
        [
            torch.full((1, spec.image_tokens), spec.image_token_id, device=device),
            torch.randint(0, spec.image_token_id, (1, text_tokens)).to(device),
        ],
        dim=1,
    )
    pixels = torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device=device, dtype=model.dtype)
    with placeholder_check_off():
        model(input_ids=ids, pixel_values=pixels, logits_to_keep=logits_to_keep)


def total_flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def reference_prefill(spec, model, vit_tokens, projector_tokens, llm_visual, text_tokens) -> dict[str, int]:
    """The prefill of a pruned model, run part by part on meta with the reduced lengths:
    ViT layers on shrinking sequences, the projector on the kept features, LLM layers
    split where the visual count changes, lm_head on the last position. FLOPs per part."""
    dt = model.dtype
    vt, lm = model.model.vision_tower, model.model.language_model
    state = {}

    def vit():
        pixels = torch.zeros(1, spec.channels, spec.image_size, spec.image_size, device="meta", dtype=dt)
        h = vt.pre_layrnorm(vt.embeddings(pixels))
        for i, layer in enumerate(vt.encoder.layers):
            h = layer(h[:, : vit_tokens[i]], None)

    def projector():
        model.model.multi_modal_projector(torch.zeros(1, projector_tokens, spec.vit.hidden, device="meta", dtype=dt))

    def llm():
        n0 = text_tokens + llm_visual[0]
        h = torch.zeros(1, n0, spec.llm.hidden, device="meta", dtype=dt)
        positions = torch.arange(n0, device="meta")[None]
        cos, sin = lm.rotary_emb(h, positions)
        for j, layer in enumerate(lm.layers):
            n = text_tokens + llm_visual[j]
            h = layer(h[:, :n], attention_mask=None, position_ids=positions[:, :n], position_embeddings=(cos[:, :n], sin[:, :n]))
        state["h"] = lm.norm(h)

    def lm_head():
        model.lm_head(state["h"][:, -1:])

    return {name: total_flops(fn) for name, fn in (("vit", vit), ("projector", projector), ("llm", llm), ("lm_head", lm_head))}


@pytest.fixture(scope="module")
def llava7b():
    spec = get_spec("llava-1.5-7b")
    return spec, spec.build("meta")


@pytest.fixture(scope="module")
def tiny():
    spec = get_spec("tiny-llava")
    return spec, spec.build("meta")


def unpruned(spec):
    return [spec.vit_tokens] * spec.vit.layers, spec.image_tokens, [spec.image_tokens] * spec.llm.layers


# --------------------------------------------------------------- hf == FlopCounterMode
@pytest.mark.slow
def test_hf_equals_flop_counter_llava7b_unpruned(llava7b):
    spec, model = llava7b
    total, parts = count(lambda: full_forward(spec, model, 64, logits_to_keep=1))
    report = estimate_counts(spec, *unpruned(spec), 64, logits="last")
    assert report.baseline.flops == report.policy.flops
    assert rel_err(report.policy.flops, total) < 1e-6
    for part, flops in parts.items():
        assert rel_err(getattr(report.policy, part), flops) < 1e-6, part
    # the figures measured in the shared notes (576 image + 64 text tokens)
    assert round(total / 1e12, 4) == 8.9104
    assert (round(parts["vit"] / 1e12, 4), round(parts["projector"] / 1e12, 4), round(parts["llm"] / 1e12, 4)) == (
        0.3819, 0.0242, 8.5040,
    )
    all_logits = estimate_counts(spec, *unpruned(spec), 64, logits="all")
    assert round(all_logits.policy.flops / 1e12, 4) == 9.0782


@pytest.mark.slow
def test_hf_equals_flop_counter_llava7b_pruned(llava7b):
    spec, model = llava7b
    vit_tokens = [577] * 8 + [289] * 8 + [145] * 8  # pruned inside the ViT twice (CLS kept)
    projector, text = 144, 40
    llm_visual = [144, 144] + [72] * 14 + [18] * 16  # FastV-like at 2, again at 16
    parts = reference_prefill(spec, model, vit_tokens, projector, llm_visual, text)
    report = estimate_counts(spec, vit_tokens, projector, llm_visual, text)
    assert rel_err(report.policy.flops, sum(parts.values())) < 1e-6
    for part, flops in parts.items():
        assert rel_err(getattr(report.policy, part), flops) < 1e-6, part
    assert report.policy.flops < 0.3 * report.baseline.flops


@pytest.mark.slow
def test_hf_llm_on_inputs_embeds_with_fewer_visual_tokens(llava7b):
    """The whole LlamaModel forward (its own masks, rotary, loop) on a shorter prompt."""
    spec, model = llava7b
    visual, text = 64, 64
    embeds = torch.zeros(1, text + visual, spec.llm.hidden, device="meta", dtype=model.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.language_model(inputs_embeds=embeds, use_cache=True)  # as in generate's prefill
    report = estimate_counts(spec, [577] * 24, visual, [visual] * 32, text)
    assert rel_err(report.policy.llm, counter.get_total_flops()) < 1e-6


@pytest.mark.parametrize("logits", ["last", "all"])
def test_hf_equals_flop_counter_tiny_unpruned(tiny, logits):
    spec, model = tiny
    total, parts = count(lambda: full_forward(spec, model, 16, logits_to_keep=1 if logits == "last" else 0))
    report = estimate_counts(spec, *unpruned(spec), 16, logits=logits)
    assert report.policy.flops == total  # exact integers
    assert {p: getattr(report.policy, p) for p in parts} == parts


def test_hf_equals_flop_counter_tiny_pruned_gqa(tiny):
    spec, model = tiny
    # pruned twice inside the ViT (CLS kept), then twice inside the LLM
    vit_tokens, projector, text = [577] * 8 + [289] * 8 + [145] * 8, 144, 11
    llm_visual = [144] * 2 + [72] * 14 + [18] * 16
    parts = reference_prefill(spec, model, vit_tokens, projector, llm_visual, text)
    report = estimate_counts(spec, vit_tokens, projector, llm_visual, text)
    assert report.policy.flops == sum(parts.values())
    assert {p: getattr(report.policy, p) for p in parts} == parts


@pytest.mark.parametrize(
    "change",
    [
        {"vision_feature_select_strategy": "full"},
        {"text_model_type": "mistral"},
        {"text_model_type": "qwen2"},
        {"kv_heads": 1},
    ],
    ids=["full-strategy", "mistral", "qwen2", "mqa"],
)
def test_hf_equals_flop_counter_config_variants(change):
    from transformers import LlavaConfig

    data = get_spec("tiny-llava").config().to_dict()
    if "vision_feature_select_strategy" in change:
        data["vision_feature_select_strategy"] = change["vision_feature_select_strategy"]
    if "text_model_type" in change:
        tc = data["text_config"]
        data["text_config"] = {
            "model_type": change["text_model_type"],
            **{k: tc[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "vocab_size", "max_position_embeddings")},
        }
    if "kv_heads" in change:
        data["text_config"]["num_key_value_heads"] = change["kv_heads"]
    spec = spec_from_config(LlavaConfig.from_dict(data), name="variant")
    model = spec.build("meta")
    total, parts = count(lambda: full_forward(spec, model, 9, logits_to_keep=1))
    report = estimate_counts(spec, *unpruned(spec), 9)
    assert report.policy.flops == total
    assert {p: getattr(report.policy, p) for p in parts} == parts


# --------------------------------------------------------------- fastv, KV, decode
def fastv_by_paper(spec, llm_visual, text):
    d, m = spec.llm.hidden, spec.llm.ffn
    total = 0
    for v in llm_visual:
        n = text + v
        total += 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    return total


def test_fastv_convention_matches_the_paper_formula():
    spec = get_spec("llava-1.5-7b")
    llm_visual = [576, 576] + [288] * 30  # FastV K=2, R=50%
    report = estimate_counts(spec, [577] * 24, 576, llm_visual, 64)
    assert report.policy.fastv == fastv_by_paper(spec, llm_visual, 64)
    assert report.baseline.fastv == fastv_by_paper(spec, [576] * 32, 64)
    # FastV reports ~ 45% FLOPs reduction for K=2 R=50% on LLaVA-1.5-7B (prompt-length dependent)
    assert 0.5 < report.fastv_ratio < 0.6
    # and both conventions agree on the LLM's reduction to about a point
    hf_llm = report.policy.llm / report.baseline.llm
    assert abs(hf_llm - report.fastv_ratio) < 0.01


def test_kv_bytes_and_decode_against_a_real_tiny_cache():
    spec = get_spec("tiny-llava")
    model = spec.build("cpu", attn_implementation="eager")  # eager: CPU sdpa is invisible to the counter
    text = 16
    ids = torch.cat([torch.full((1, spec.image_tokens), spec.image_token_id), torch.arange(1, text + 1)[None]], 1)
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    step0 = estimate_counts(spec, *unpruned(spec), text, decode_context=None)
    assert step0.policy.kv_bytes == cache_bytes
    for ctx in (0, 1):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True)
        report = estimate_counts(spec, *unpruned(spec), text, decode_context=ctx)
        assert report.policy.decode == counter.get_total_flops()


def test_kv_bytes_pruned_by_hand():
    spec = get_spec("llava-1.5-7b")
    llm_visual = [576, 576] + [144] * 30
    report = estimate_counts(spec, [577] * 24, 576, llm_visual, 64)
    by_hand = sum(2 * 32 * 128 * (64 + v) * 2 for v in llm_visual)
    assert report.policy.kv_bytes == by_hand
    assert report.baseline.kv_bytes == 32 * 2 * 32 * 128 * 640 * 2 == 335_544_320
    tiny = get_spec("tiny-llava")  # GQA: 2 KV heads of 32 / 4 = 8, float32; 32 layers
    tiny_visual = [576, 576] + [288] * 14 + [36] * 16
    r = estimate_counts(tiny, [577] * 24, 576, tiny_visual, 10)
    assert r.policy.kv_bytes == sum(2 * 2 * 8 * (10 + v) * 4 for v in tiny_visual)


def test_decode_pruned_by_hand():
    spec = get_spec("tiny-llava")
    llm_visual, text, ctx = [576, 576] + [288] * 14 + [36] * 16, 10, 5
    r = estimate_counts(spec, [577] * 24, 576, llm_visual, text, decode_context=ctx)
    d, f, qd, kvd, V = 32, 64, 32, 16, 256  # hidden, ffn, 4 heads x 8, 2 KV heads x 8, vocab
    per_layer_linear = 2 * (2 * d * qd + 2 * d * kvd + 3 * d * f)
    by_hand = sum(per_layer_linear + 2 * 2 * qd * (text + v + ctx + 1) for v in llm_visual) + 2 * d * V
    assert r.policy.decode == by_hand


# --------------------------------------------------------------- scorers and plans
def obs(tower, layer, queries, scorer="attn"):
    return Observation(scorer, (), tower, layer, queries)


def leaf(o):
    return ResolvedScore("leaf", o)


def test_scorer_extras_equal_the_counted_matmuls(llava7b):
    """The contract's matmuls run on meta tensors, counted: each observation and stage."""
    spec, _ = llava7b
    vit_tokens = [577] * 12 + [289] * 12
    llm_visual = [144] * 2 + [72] * 30
    text = 30
    H, dh, Hv, dhv, d, dv = 32, 128, 16, 64, 4096, 1024

    def attn_rows(m, n, heads, head_dim):
        q = torch.zeros(1, heads, m, head_dim, device="meta")
        k = torch.zeros(1, heads, n, head_dim, device="meta")
        torch.softmax((q @ k.transpose(-1, -2)).float(), -1).mean(1)

    cases = [
        (obs("vit", 22, "cls"), lambda: attn_rows(1, 289, Hv, dhv)),
        (obs("vit", 5, "all"), lambda: attn_rows(577, 577, Hv, dhv)),
        (obs("llm", 1, "last_text"), lambda: attn_rows(1, text + 144, H, dh)),
        (obs("llm", 8, "all_text"), lambda: attn_rows(text, text + 72, H, dh)),
        (obs("llm", 8, "last4_text"), lambda: attn_rows(4, text + 72, H, dh)),
        (obs("llm", 8, "all"), lambda: attn_rows(text + 72, text + 72, H, dh)),
        (obs("llm", 8, "none", scorer="norm"), lambda: None),
    ]
    for o, ref in cases:
        counted, _ = count(ref)
        report = estimate_counts(spec, vit_tokens, 144, llm_visual, text, observations=[o])
        assert report.policy.scorers == counted, o

    def cosine(n, width):
        x = torch.nn.functional.normalize(torch.zeros(n, width, device="meta"), dim=-1)
        x @ x.T

    def assign(rest, t, width):  # the non-kept R-t tokens against t targets
        torch.zeros(rest, width, device="meta") @ torch.zeros(width, t, device="meta")

    site_llm, site_vit = ResolvedSite("llm", 2), ResolvedSite("vit", None)
    stage_cases = [
        (ResolvedStage(0, site_llm, "keep", 144, 72, terms=(ResolvedTerm("diverse", 72),)), lambda: cosine(144, d)),
        (ResolvedStage(0, site_vit, "keep", 576, 64, terms=(ResolvedTerm("top", 54, leaf(obs("vit", 22, "cls"))),), rest=Merged(10)),
         lambda: assign(576 - 54 - 10, 10, dv)),
        (ResolvedStage(0, site_vit, "merge", 577, 477, merge_rest=100), lambda: assign(289, 288, dv)),
        (ResolvedStage(0, site_llm, "pool", 144, 36, pool=(2, 2)), lambda: None),
        (ResolvedStage(0, site_llm, "keep", 144, 20, terms=(ResolvedTerm("uniform", 10), ResolvedTerm("random", 10, seed=1))), lambda: None),
    ]
    for stage, ref in stage_cases:
        counted, _ = count(ref)
        report = estimate_counts(spec, vit_tokens, 144, llm_visual, text, stages=[stage])
        assert report.policy.scorers == counted, stage


def visionzip_fastv_plan():
    spec = get_spec("llava-1.5-7b")
    cls = obs("vit", 22, "cls", scorer="cls")
    last = obs("llm", 1, "last_text")
    stages = [
        ResolvedStage(0, ResolvedSite("vit", None), "keep", 576, 64,
                      terms=(ResolvedTerm("top", 54, leaf(cls)),), rest=Merged(10)),
        ResolvedStage(1, ResolvedSite("llm", 2), "keep", 64, 32,
                      terms=(ResolvedTerm("top", 16, leaf(last)), ResolvedTerm("top", 16, ResolvedScore("mean", args=(leaf(last), leaf(cls)))))),
    ]
    return Plan(Policy(), spec, stages, [577] * 24, 64, [64, 64] + [32] * 30)


def test_estimate_plan_counts_each_observation_once():
    plan = visionzip_fastv_plan()
    report = estimate(plan, text_tokens=50)
    vit_cls = 2 * 1 * 577 * 16 * 64
    llm_last = 2 * 1 * (50 + 64) * 32 * 128
    merge = 2 * (576 - 54 - 10) * 10 * 1024
    assert report.policy.scorers == vit_cls + llm_last + merge
    direct = estimate_counts(plan.spec, plan.vit_tokens, 64, plan.llm_visual, 50)
    assert report.policy.flops == direct.policy.flops + vit_cls + llm_last + merge
    assert report.visual_tokens_to_llm == 64 and report.baseline.visual == 576
    data = report.to_json()
    assert data["flops"]["policy"] == report.policy.flops
    assert data["flops"]["ratio"] == pytest.approx(report.policy.flops / report.baseline.flops)
    assert set(data["flops"]["by_part"]) == {"vit", "projector", "llm", "lm_head", "scorers"}
    assert data["flops"]["by_part"]["scorers"]["policy"] == vit_cls + llm_last + merge
    assert set(data["flops_fastv"]) == set(data["kv_cache_bytes"]) == {"baseline", "policy", "ratio"}
    assert data["visual_tokens_to_llm"] == 64
    assert sum(i["flops"] for i in data["scorers"]) == vit_cls + llm_last + merge
    assert any("unused" in n for n in data["notes"])
    assert sum(report.per_layer()["llm"]) == report.policy.llm


def test_baseline_is_the_plan_without_stages():
    plan = visionzip_fastv_plan()
    spec = plan.spec
    empty = Plan(Policy(), spec, [], [577] * 24, 576, [576] * 32)
    a, b = estimate(plan), estimate(empty)
    assert b.policy.flops == b.baseline.flops == a.baseline.flops
    assert b.flops_ratio == 1.0 and a.flops_ratio < 0.2


def test_bad_counts_are_rejected():
    spec = get_spec("tiny-llava")
    with pytest.raises(ValueError, match="24 ViT layers"):
        estimate_counts(spec, [577] * 23, 576, [576] * 32)
    with pytest.raises(ValueError, match="32 LLM layers"):
        estimate_counts(spec, [577] * 24, 576, [576] * 31)
    with pytest.raises(ValueError, match="logits"):
        estimate_counts(spec, [577] * 24, 576, [576] * 32, logits="first")
    with pytest.raises(ValueError, match="text queries"):
        estimate_counts(spec, [577] * 24, 576, [576] * 32, observations=[obs("vit", 1, "last_text")])


# --------------------------------------------------------------- budgets
def test_budget_verdicts_percent_and_absolute():
    spec = get_spec("llava-1.5-7b")
    report = estimate_counts(spec, [577] * 24, 144, [144] * 32, 64)
    budgets = [
        Budget(metric="tokens", op="<=", value=25, percent=True),
        Budget(metric="tokens", op="<", value=25, percent=True),
        Budget(metric="flops", op="<=", value=30, percent=True),
        Budget(metric="flops", op="<=", value=40, percent=True),
        Budget(metric="kv", op="<", value=2**30),
        Budget(metric="flops_fastv", op="<=", value=1e12),
    ]
    v = verdicts(report, budgets)
    assert [x["ok"] for x in v] == [True, False, False, True, True, False]
    assert [x["constraint"] for x in v] == [
        "tokens <= 25%", "tokens < 25%", "flops <= 30%", "flops <= 40%", f"kv < {2**30}", "flops_fastv <= 1000000000000",
    ]
    assert v[0]["value"] == 144 and v[0]["limit"] == 144 and v[0]["baseline"] == 576
    assert v[2]["limit"] == pytest.approx(0.3 * report.baseline.flops)
    assert v[4]["value"] == sum(2 * 32 * 128 * (64 + 144) * 2 for _ in range(32))


def test_parse_budget_strings():
    assert parse_budget("flops <= 25%") == Budget(metric="flops", op="<=", value=25, percent=True)
    assert parse_budget("budget tokens<144") == Budget(metric="tokens", op="<", value=144)
    assert parse_budget("kv <= 1.5GiB").value == int(1.5 * 2**30)
    assert parse_budget("flops_fastv <= 3.5T").value == 3_500_000_000_000
    assert parse_budget("flops <= 12.5%").value == 12.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("flop <= 25%", "did you mean 'flops'"),
        ("flops >= 25%", "cannot read it"),
        ("flops <= lots", "cannot read it"),
        ("tokens <= 2GB", "only 'kv' is measured in bytes"),
        ("kv <= 3 parsecs", "unknown unit"),
        ("kv <= 3Q", "unknown unit"),
        ("flops <= 120%", "a percentage must lie in 0..100"),
    ],
)
def test_parse_budget_errors(text, message):
    with pytest.raises(PolicyError) as info:
        parse_budget(text)
    assert message in str(info.value)
    assert "flops <= 25%" in str(info.value)  # the expected form is shown


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pdrop", "visionzip-64", "hiprune", "tome-64", "sparsevlm-64"])
def test_hf_equals_flop_counter_llava7b_zoo_policies(llava7b, name):
    """Zoo policies through check and estimate: each part of the policy side equals the
    FlopCounterMode count of a reference prefill run on meta with the plan's token counts
    (the scorers' own extra matmuls are compared against the counter in
    test_scorer_extras_equal_the_counted_matmuls)."""
    spec, model = llava7b
    plan = check(parse_file(ROOT_DIR / "policies" / f"{name}.vt"), spec)
    text = 64
    parts = reference_prefill(spec, model, plan.vit_tokens, plan.projector_tokens, plan.llm_visual, text)
    report = estimate(plan, text_tokens=text)
    for part, flops in parts.items():
        assert rel_err(getattr(report.policy, part), flops) < 1e-6, part
    assert report.policy.flops - report.policy.scorers < report.baseline.flops
