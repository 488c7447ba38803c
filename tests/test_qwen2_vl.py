"""Qwen2-VL (issue 19 item 1): the spec from the published config, the cost model against
FlopCounterMode (full-attention ViT: no windows), compiled LLM stages against a masked
reference, M-RoPE streams kept, image sizes as its processor makes them. Expected numbers
are computed here from the architecture, not read from vtdsl."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate, estimate_counts
from vtdsl.ir import check
from vtdsl.models import get_spec, list_specs

from plain_refs import (plain_copy, first_error, masked_generate, mrope_inputs, qwen_7b_merger_llm_flops,
                        qwen_meta_prefill_flops, sharpened_pair)

from family_runs import assert_fastv_matches_masked_reference, compiled_prefill_flops

SPEC = get_spec("tiny-qwen2-vl")
IMG, START, END = 250, 251, 252
SIDE = 16  # 224 px / 14: patches per side of the reference image
N_IMG = (SIDE // 2) ** 2  # 64 merged tokens


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def inputs(batch: int, side: int = SIDE, seed: int = 5):
    """One image per prompt, wrapped in vision start/end; batch 2 is left-padded."""
    return mrope_inputs(batch, side, seed)


def fresh_copy(model, attn="eager"):
    return plain_copy(SPEC, model, attn)


# ---------------------------------------------------------------------------- spec and cost
def _qwen2_vl_7b_params() -> int:
    """Qwen2-VL-7B's parameters from its architecture (biases as in the released model:
    ViT linears and LLM q/k/v have them, o_proj and the LLM MLP do not)."""
    d, ffn, vocab, h, kv, mlp = 1280, 5120, 152064, 3584, 512, 18944
    patch = 3 * 2 * 14 * 14 * d
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ffn + ffn) + (ffn * d + d)
    merger = 2 * d + (4 * d * 4 * d + 4 * d) + (4 * d * h + h)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp + 2 * h
    return patch + 32 * block + merger + vocab * h + 28 * layer + h + vocab * h


def test_spec_from_the_published_config():
    s = get_spec("qwen2-vl-7b")
    assert get_spec("Qwen/Qwen2-VL-7B-Instruct") is s
    assert (s.family, s.has_cls, s.spatial_merge, s.temporal_patch, s.position_encoding) == (
        "qwen2-vl", False, 2, 2, "mrope")
    assert (s.vit.layers, s.vit.hidden, s.vit.ffn, s.vit.heads, s.vit.mlp) == (32, 1280, 5120, 16, "gelu")
    assert (s.llm.layers, s.llm.hidden, s.llm.heads, s.llm.kv_heads, s.llm.ffn) == (28, 3584, 28, 4, 18944)
    assert s.vit_window == 0 and s.vit_full_attention == ()  # every block attends over the whole image
    assert (s.vit_tokens, s.image_tokens, s.projector) == (48 * 48, 24 * 24, (5120, 5120, 3584))
    assert (s.min_pixels, s.max_pixels) == (3136, 12845056)
    assert s.param_count() == _qwen2_vl_7b_params() == 8_291_375_616  # the published 8.29 B
    assert family_of(s).name == "qwen2-vl" and family_of(SPEC).sized_per_image


def test_vtdsl_models_lists_both():
    from click.testing import CliRunner

    from vtdsl.cli import main

    names = [spec.name for spec in list_specs()]
    assert {"qwen2-vl-7b", "tiny-qwen2-vl"} <= set(names)
    run = CliRunner().invoke(main, ["models"])
    assert run.exit_code == 0 and "qwen2-vl-7b" in run.output and "tiny-qwen2-vl" in run.output


def test_cost_of_qwen2_vl_7b_equals_flop_counter_on_meta():
    """The prefill at 672x672 (48x48 patches), counted by FlopCounterMode
    (`plain_refs.qwen_meta_prefill_flops`), against the architecture's FLOPs by hand."""
    spec = get_spec("qwen2-vl-7b")
    flops, text = qwen_meta_prefill_flops(spec.build(device="meta", attn_implementation="eager"), side=48)
    n, d, ffn = 2304, 1280, 5120
    block = 2 * n * (4 * d * d + 2 * d * ffn) + 4 * d * n * n  # qkv, proj, fc1, fc2; QK^T and AV over all n
    vit = 2 * n * 1176 * d + 32 * block
    independent = vit + qwen_7b_merger_llm_flops(text)
    assert flops == independent
    assert estimate_counts(spec, [n] * 32, 576, [576] * 28, text).baseline.flops == independent


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at llm.layer0 pool 2x2; at llm.layer2 keep text top 5",
])
def test_compiled_flops_equal_the_cost_model(models, src):
    flops = compiled_prefill_flops(models["eager"], src, inputs(1))
    assert flops == estimate(check(src, SPEC), text_tokens=8, logits="all").flops


# ---------------------------------------------------------------------------- LLM stages
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_generate_matches_masked_reference(models, attn, batch):
    model = models[attn]
    assert_fastv_matches_masked_reference(model, fresh_copy(model), inputs(batch), IMG, N_IMG)


def test_llm_layer0_keeps_the_three_position_streams(models):
    """Tokens dropped before the LLM leave the kept ones their (t, h, w) M-RoPE positions:
    the same as masking the dropped rows everywhere."""
    model = models["sdpa"]
    batch_inputs = inputs(2)
    ids = batch_inputs["input_ids"]
    pruned = []
    for b in range(2):
        rows = (ids[b] == IMG).nonzero().flatten()
        chosen = rows[[i * N_IMG // 20 for i in range(20)]]  # `uniform 20`: ranks floor(i·n/k)
        pruned.append(rows[~torch.isin(rows, chosen)])
    want = masked_generate(fresh_copy(model, "sdpa"), batch_inputs, pruned, from_layer=0, new_tokens=6)
    with vc.apply("at llm.layer0 keep uniform 20", model):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_an_image_of_another_size_runs_the_plan_checked_for_it(models):
    """A 168x168 image (12x12 patches, 36 merged tokens) keeps 18 at `top 50%`."""
    model = models["eager"]
    batch_inputs = inputs(1, side=12, seed=6)
    with vc.apply("at llm.layer2 keep text top 50%", model), torch.no_grad():
        model(**batch_inputs)
        assert vc.kept_counts(model)["llm"]["llm.layer2#0"] == (36, 18)


# ---------------------------------------------------------------------------- check time
@pytest.mark.parametrize("src, at, code, words", [
    ("at llm.layer2 keep cls@vit.layer3 top 20", "cls@", "no-cls", "qwen2-vl's vision tower has no CLS token"),
    ("at llm.layer2 keep text top 20 renumber", "renumber", "renumber", "M-RoPE"),
])
def test_refusals_are_located_and_say_why(src, at, code, words):
    d = first_error(src, SPEC)
    assert (d.span.line, d.span.column, d.code) == (1, src.index(at) + 1, code)
    assert words in d.message + (d.expected or "")


def test_visual_tokens_for_image_sizes_equal_the_processor():
    from transformers import Qwen2VLImageProcessor

    spec = get_spec("qwen2-vl-7b")
    processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    for height, width in [(28, 28), (57, 55), (600, 800), (28000, 28000), (28, 5600), (3585, 3583)]:
        want = processor.get_number_of_image_patches(height, width, {}) // 4
        assert spec.for_image(height, width).image_tokens == want, (height, width)


def test_a_hub_style_directory_gives_the_registered_spec(tmp_path):
    """Qwen/Qwen2-VL-7B-Instruct's config.json layout (text keys at the top level, vision
    `in_chans`, `rope_scaling` of type mrope) and its preprocessor_config.json: the same
    architecture and pixel range as the built-in written as data."""
    import json

    hub = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "torch_dtype": "bfloat16",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}))
    local, builtin = get_spec(str(tmp_path)), get_spec("qwen2-vl-7b")
    fields = ("family", "vit", "llm", "projector", "vocab_size", "image_token_id", "dtype", "image_tokens",
              "min_pixels", "max_pixels", "position_encoding", "vit_window")
    assert [getattr(local, f) for f in fields] == [getattr(builtin, f) for f in fields]
    assert local.for_image(28000, 28000).image_tokens == 16384


def test_a_policy_without_stages_leaves_video_alone(models):
    """Compiled without stages, a video call generates as the plain model (LLM stages on
    video: tests/test_qwen_video.py)."""
    model, vid = models["eager"], SPEC.config().video_token_id
    ids = torch.tensor([[5, 6, 7, 251] + [vid] * (2 * 64) + [252, 8, 9, 10]])
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                pixel_values_videos=torch.randn(2 * 256, 1176), video_grid_thw=torch.tensor([[2, 16, 16]]),
                mm_token_type_ids=(ids == vid).int() * 2)
    with torch.no_grad():
        plain = model.generate(**call)
        with vc.apply("", model):
            assert torch.equal(model.generate(**call), plain)
