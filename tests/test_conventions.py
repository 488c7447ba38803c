"""FLOP-counting conventions: the table's rows, published figures recomputed from them,
and the `vtdsl check` options that select them (docs/cost-model.md, "Published figures")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vtdsl.cli import main
from vtdsl.cli.check_cmd import load_plan
from vtdsl.cost import estimate, estimate_counts
from vtdsl.cost.conventions import CONVENTIONS, Convention, get_convention
from vtdsl.cost.estimate import estimate_expected, expected_counts
from vtdsl.models import get_spec

from plain_refs import image_zoo

ROOT = Path(__file__).resolve().parent.parent


def llava7b_counts(llm_visual):
    return [577] * 24, 576, llm_visual


def pyramid(cuts, layers=32, start=576):
    """PDrop's schedule: the image tokens halve at each cut layer."""
    out, v, prev = [], start, 0
    for cut in list(cuts) + [layers]:
        out += [v] * (cut - prev)
        prev, v = cut, v // 2
    return out


def run_check(*args) -> dict:
    result = CliRunner().invoke(main, ["check", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# ------------------------------------------------------------------ the rows
def paper_formula(spec, llm_visual, text, ffn_matrices, image_only=False):
    """Σ_layers 4nd² + 2n²d + k·n·d·m, written out independently of the cost model."""
    d, m = spec.llm.hidden, spec.llm.ffn
    total = 0
    for v in llm_visual:
        n = v if image_only else text + v
        total += 4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m
    return total


@pytest.mark.parametrize("path", [str(p) for p in image_zoo()])  # llava-1.5-7b's files; evs.vt is video
def test_hf_and_fastv_rows_are_the_figures_the_report_always_gave(path):
    plan, _, _ = load_plan(path, "llava-1.5-7b")
    for logits in ("last", "all"):
        report = estimate(plan, text_tokens=40, logits=logits)
        hf, fastv = report.convention("hf"), report.convention("fastv")
        assert (hf["baseline"], hf["policy"]) == (report.baseline.flops, report.policy.flops)
        assert (fastv["baseline"], fastv["policy"]) == (report.baseline.fastv, report.policy.fastv)


def test_rows_against_the_papers_formulas():
    spec = get_spec("llava-1.5-7b")
    llm_visual = [576] * 2 + [288] * 30
    report = estimate_counts(spec, *llava7b_counts(llm_visual), 53)
    assert report.convention("fastv")["policy"] == paper_formula(spec, llm_visual, 53, 2)
    assert report.convention("sparsevlm")["policy"] == paper_formula(spec, llm_visual, 53, 3)
    assert report.convention("pdrop")["policy"] == paper_formula(spec, llm_visual, 53, 3, image_only=True)
    assert report.convention("fastv-per-layer")["policy"] * 32 == paper_formula(spec, llm_visual, 53, 2)
    # the LLM alone as FlopCounterMode counts it is the report's llm part
    assert report.convention("llm")["policy"] == report.policy.llm


def test_gqa_counts_only_in_model_widths():
    spec = get_spec("qwen2.5-vl-7b")  # 28 heads, 4 KV heads
    report = estimate_counts(spec, [spec.vit_tokens] * 32, 576, [576] * 28, 64)
    assert report.convention("llm")["policy"] == report.policy.llm
    # "square" widths ignore GQA: the paper formula with d = 3584
    assert report.convention("sparsevlm")["policy"] == paper_formula(spec, [576] * 28, 64, 3)


def test_a_convention_row_is_checked():
    with pytest.raises(ValueError, match="per-layer"):
        Convention("bad", 2, None, "model", "model", "prompt", False, None, "")
    with pytest.raises(ValueError, match="mac"):
        Convention("bad", 3, None, "model", "llm", "prompt", True, None, "")
    with pytest.raises(ValueError, match="expected one of: hf, fastv"):
        get_convention("nope")
    assert set(CONVENTIONS) >= {"hf", "fastv", "pdrop", "divprune", "sparsevlm"}


# ------------------------------------------------------------------ published figures
@pytest.mark.parametrize("cuts, paper_tflops", [
    ((), 3.82),             # vanilla LLaVA-1.5-7B
    ((10, 20), 2.13),       # λ = 0.5, S = 3
    ((8, 16, 24), 1.78),    # λ = 0.5, S = 4 (the PDrop default)
    ((6, 12, 18, 24), 1.38),  # λ = 0.5, S = 5: 1.391, 0.8 % above the paper
])
def test_pdrop_appendix_table_stage_ablation(cuts, paper_tflops):
    # arXiv 2410.17247v2, appendix Table 1 (ablation of the stage count S), "Infer Flops(T)"
    spec = get_spec("llava-1.5-7b")
    report = estimate_counts(spec, *llava7b_counts(pyramid(cuts)), 64)
    tflops = report.convention("pdrop")["policy"] / 1e12
    assert abs(tflops - paper_tflops) / paper_tflops < 0.01


# DivPrune's tflops.py (github vbdi/divprune; its README: "the TFLOP numbers reported in
# the paper"): 11 image benchmarks' prompt lengths, 56 of 576 tokens kept at the LLM input
DIVPRUNE_LENGTHS = "15,15,23,83,25,113,15,39,21,91,57"


@pytest.mark.parametrize("model, full, pruned, ratio", [
    ("llava-1.5-7b", 3.2280, 0.5122, 15.6303),
    ("llava-1.5-13b", 6.2813, 1.0020, 15.7132),
])
def test_divprune_script_figures(model, full, pruned, ratio):
    data = run_check("policies/divprune.vt", "-m", model, "--text-tokens", DIVPRUNE_LENGTHS)
    row = data["conventions"]["divprune"]
    assert round(row["baseline"] / 1e12, 4) == full
    assert round(row["policy"] / 1e12, 4) == pruned
    assert round(100 * row["ratio"], 4) == ratio
    assert data["text_tokens_list"] == [int(t) for t in DIVPRUNE_LENGTHS.split(",")]
    assert data["text_tokens"] == 45  # the other figures: the mean length (497 / 11), rounded


# ------------------------------------------------------------------ options
def test_text_output_names_the_convention():
    result = CliRunner().invoke(main, ["check", "policies/pdrop.vt", "-m", "llava-1.5-7b", "--convention", "pdrop"])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("FLOPs (pdrop)"))
    assert line.endswith("/ 3.817 TFLOPs = 46.56%")
    plain = CliRunner().invoke(main, ["check", "policies/pdrop.vt", "-m", "llava-1.5-7b"])
    assert "FLOPs (pdrop)" not in plain.output


def test_logits_option():
    last = run_check("policies/fastv.vt", "-m", "llava-1.5-7b")
    every = run_check("policies/fastv.vt", "-m", "llava-1.5-7b", "--logits", "all")
    spec = get_spec("llava-1.5-7b")
    head = 2 * spec.llm.hidden * spec.vocab_size
    assert every["flops"]["baseline"] - last["flops"]["baseline"] == head * (64 + 576 - 1)
    assert every["flops"]["baseline"] == 9_078_220_357_632  # docs/cost-model.md, FlopCounterMode


@pytest.mark.parametrize("value", ["abc", "12,", "-3", "1,x"])
def test_bad_text_tokens_is_a_one_line_error(value):
    result = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "llava-1.5-7b", "--text-tokens", value])
    assert result.exit_code == 2
    assert "expected a token count or a comma-separated list" in result.output
    assert "Traceback" not in result.output


def test_llava_next_without_newline_tokens():
    spec = get_spec("llava-next-7b")
    assert spec.image_tokens == 2928  # 576 + 48 rows x (48 + 1)
    with_nl = run_check("policies/fastv.vt", "-m", "llava-next-7b")["conventions"]["fastv"]
    without = run_check("policies/fastv.vt", "-m", "llava-next-7b", "--no-newlines")
    row = without["conventions"]["fastv"]
    assert without["newlines"] is False
    assert row["baseline"] == paper_formula(spec, [2880] * 32, 64, 2)
    assert with_nl["baseline"] == paper_formula(spec, [2928] * 32, 64, 2)
    # FastV's layers 0-1 see the intact layout (less its newlines); after layer 2 the kept count
    kept = without["tokens"]["llm_visual"][2]
    assert row["policy"] == paper_formula(spec, [2880] * 2 + [kept] * 30, 64, 2)


def test_expected_figures_of_an_adaptive_policy():
    plan, _, _ = load_plan(str(ROOT / "policies" / "prumerge.vt"), "llava-1.5-7b")
    stage = next(s for s in plan.stages if s.tokens_out_min is not None)
    # at the bound the expectation is the plain (worst-case) figure
    assert expected_counts(plan, stage.tokens_out) == (plan.vit_tokens, plan.projector_tokens, plan.llm_visual)
    # PruMerge decides its count at vit.out: with 32 kept, 32 tokens go through the projector and every LLM layer
    vit, projector, llm = expected_counts(plan, 32)
    assert (vit, projector, llm) == (plan.vit_tokens, 32, [32] * 32)
    report = estimate_expected(plan, 32)
    assert report.policy.fastv == paper_formula(plan.spec, [32] * 32, 64, 2)
    data = run_check("policies/prumerge.vt", "-m", "llava-1.5-7b", "--expect-tokens", "32")
    assert data["expected"]["visual_tokens_to_llm"] == 32
    assert data["expected"]["conventions"]["fastv"]["policy"] == report.policy.fastv
    assert data["flops"]["policy"] > data["expected"]["conventions"]["hf"]["policy"]  # the bound is the worst case


def test_unknown_convention_is_a_one_line_error_and_help_names_the_rows():
    result = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "llava-1.5-7b", "--convention", "fastV"])
    assert result.exit_code == 2
    assert "unknown convention 'fastV'; expected one of: hf, fastv," in result.output
    help_text = " ".join(CliRunner().invoke(main, ["check", "--help"]).output.split())
    named = help_text.split("counting convention:")[1].split("...")[0]
    assert all(name.strip() in CONVENTIONS for name in named.split(",") if name.strip())
