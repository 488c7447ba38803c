"""Qwen3-VL (issue 19 item 2): the spec from the Qwen3-VL-8B config, the cost model against
FlopCounterMode part by part (the DeepStack mergers counted with the vision tower), compiled
LLM stages against a masked reference, and DeepStack: a stage before the last injection
keeps the injected features on the kept tokens' rows. Expected numbers are computed here
from the architecture, not read from vtdsl."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec, list_specs
from vtdsl.models.builtins import BUILTINS

from plain_refs import (first_error, last_query_attention, llm_layers, mrope_inputs, plain_copy,
                        prune_to_top, sharpened_pair, top_k_reference)

from family_runs import assert_fastv_matches_masked_reference, compiled_generate, qwen_prefill_parts

SPEC = get_spec("tiny-qwen3-vl")
IMG = 250
SIDE = 16  # 256 px / 16: patches per side of the reference image
N_IMG = (SIDE // 2) ** 2  # 64 merged tokens


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


# one image of side x side patches per prompt (side 16 by default), wrapped in vision
# start/end; batch 2 is left-padded
inputs = functools.partial(mrope_inputs, patch=16)


# ---------------------------------------------------------------------------- spec and counts
def _qwen3_vl_8b_params() -> int:
    """Qwen3-VL-8B's parameters from its architecture: ViT linears and norms with biases,
    2304 learned positions, four mergers (the main one and three DeepStack ones, whose
    LayerNorm spans the 4 merged patches), the LLM without biases, q/k norms per head."""
    d, ffn, h, kv, mlp, vocab, dh = 1152, 4304, 4096, 1024, 12288, 151936, 128
    patch = 3 * 2 * 16 * 16 * d + d + 2304 * d
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * ffn + ffn) + (ffn * d + d)
    wide = 4 * d
    merger = (wide * wide + wide) + (wide * h + h)
    mergers = (2 * d + merger) + 3 * (2 * wide + merger)
    layer = 2 * h * h + 2 * h * kv + 3 * h * mlp + 2 * h + 2 * dh
    return patch + 27 * block + mergers + vocab * h + 36 * layer + h + vocab * h


def test_spec_from_the_published_config():
    s = get_spec("qwen3-vl-8b")
    assert get_spec("Qwen/Qwen3-VL-8B-Instruct") is s
    assert (s.family, s.has_cls, s.patch_size, s.spatial_merge, s.temporal_patch, s.position_encoding) == (
        "qwen3-vl", False, 16, 2, 2, "mrope")
    assert (s.vit.layers, s.vit.hidden, s.vit.ffn, s.vit.heads, s.vit.mlp) == (27, 1152, 4304, 16, "gelu")
    assert (s.llm.layers, s.llm.hidden, s.llm.heads, s.llm.kv_heads, s.llm.head_dim, s.llm.ffn) == (
        36, 4096, 32, 8, 128, 12288)
    assert (s.deepstack_layers, s.deepstack_llm_layers) == ((8, 16, 24), (0, 1, 2))
    assert (s.vit_tokens, s.image_tokens, s.projector) == (48 * 48, 24 * 24, (4608, 4608, 4096))
    assert (s.min_pixels, s.max_pixels) == (65536, 16777216)
    assert s.param_count() == _qwen3_vl_8b_params() == 8_767_123_696  # the published 8.77 B
    assert family_of(s).name == "qwen3-vl" and family_of(SPEC).sized_per_image
    assert SPEC.deepstack_llm_layers == (0, 1, 2) and SPEC.image_tokens == N_IMG


def test_vtdsl_models_lists_both():
    from click.testing import CliRunner

    from vtdsl.cli import main

    assert {"qwen3-vl-8b", "tiny-qwen3-vl"} <= {spec.name for spec in list_specs()}
    run = CliRunner().invoke(main, ["models"])
    assert run.exit_code == 0 and "qwen3-vl-8b" in run.output and "tiny-qwen3-vl" in run.output


def test_visual_tokens_for_image_sizes_equal_the_processor():
    """Qwen3-VL's processor is transformers' Qwen2-VL one at patch 16 (32-pixel merge
    units) and the checkpoint's pixel range; its PIL variant needs no torchvision."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = get_spec("qwen3-vl-8b")
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                                         merge_size=2, temporal_patch_size=2)
    sizes = [(32, 32), (57, 55), (256, 256), (600, 800), (768, 768), (1080, 1920), (4096, 4096), (8000, 6000),
             (32, 6400), (3585, 3583), (33000, 33000)]
    for height, width in sizes:
        want = processor.get_number_of_image_patches(height, width, {}) // 4
        assert spec.for_image(height, width).image_tokens == want, (height, width)
    # by hand: 768x768 is 24x24 merge units; 32x32 is brought up to 65536 pixels: 8x8
    assert (spec.for_image(768, 768).image_tokens, spec.for_image(32, 32).image_tokens) == (576, 64)


def test_a_hub_style_directory_gives_the_registered_spec(tmp_path):
    """Qwen/Qwen3-VL-8B-Instruct's config.json layout (vision `model_type` "qwen3_vl", which
    transformers renames; `rope_scaling` and `rope_theta` in the text config) and its
    preprocessor_config.json: the architecture and pixel range of the built-in."""
    import json

    vision = {**{k: v for k, v in BUILTINS["qwen3-vl-8b"][0]["vision_config"].items()}, "model_type": "qwen3_vl"}
    text = {k: v for k, v in BUILTINS["qwen3-vl-8b"][0]["text_config"].items() if k != "rope_parameters"}
    text.update(rope_theta=5000000, rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                  "rope_type": "default"}, dtype="bfloat16")
    hub = {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
           "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
           "tie_word_embeddings": False, "vision_config": vision, "text_config": text}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "merge_size": 2,
         "temporal_patch_size": 2}))
    local, builtin = get_spec(str(tmp_path)), get_spec("qwen3-vl-8b")
    fields = ("family", "vit", "llm", "projector", "vocab_size", "image_token_id", "dtype", "min_pixels",
              "max_pixels", "position_encoding", "deepstack_layers", "patch_size")
    assert [getattr(local, f) for f in fields] == [getattr(builtin, f) for f in fields]
    # no vtdsl_reference_image there: counts at 672x672, 21x21 merge units of 32 pixels
    assert local.image_tokens == 441 and local.for_image(768, 768).image_tokens == builtin.image_tokens == 576


def test_videos_are_not_counted():
    with pytest.raises(ValueError, match="takes no video input"):
        get_spec("qwen3-vl-8b").for_video(4, 448, 448)


# ---------------------------------------------------------------------------- FLOPs
def _meta_prefill_parts(model, side: int, image_token_id: int = 151655) -> tuple[dict, int]:
    """FlopCounterMode of a Qwen3-VL prefill on the meta device, split by module: the vision
    tower (patch embedding, blocks, DeepStack mergers), its merger, the LLM, lm_head (last
    row). The tower is called directly with its index inputs precomputed (meta tensors
    cannot be read); the LLM gets the model's own M-RoPE ids. DeepStack's additions are
    element-wise, no FLOPs, so the LLM runs on the scattered embeddings alone."""
    import transformers.vision_utils as vu

    vis, n_img = model.model.visual, (side // 2) ** 2
    grid = torch.tensor([[1, side, side]])
    ids = torch.tensor([[9] * 20 + [151652] + [image_token_id] * n_img + [151653] + [9] * 42])
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_token_id).int(), image_grid_thw=grid)
    taps, weights = vu.get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=vis.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    pixels = torch.empty(side * side, 3 * 2 * 16 * 16, dtype=model.dtype, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = vis(pixels, grid_thw=grid, position_ids=vu.get_vision_position_ids(grid, 2).to("meta"),
                  interp_indices=taps.to("meta"), interp_weights=weights.to("meta"))
        embeds = model.get_input_embeddings()(ids.to("meta"))
        embeds = embeds.masked_scatter((ids == image_token_id)[..., None].to("meta"), out.pooler_output)
        model(inputs_embeds=embeds, position_ids=pos.to("meta"), use_cache=False, logits_to_keep=1)
    assert len(out.deepstack_features) == 3
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    tower, top = type(vis).__name__, type(model).__name__
    parts = {"vit": counts[tower] - counts[f"{tower}.merger"], "projector": counts[f"{tower}.merger"],
             "llm": counts[f"{top}.model.language_model"], "lm_head": counts[f"{top}.lm_head"]}
    assert sum(parts.values()) == counter.get_total_flops()
    return parts, ids.shape[1] - n_img


@pytest.mark.slow
def test_cost_of_qwen3_vl_8b_equals_flop_counter_on_meta_part_by_part():
    """The prefill at 768x768 (48x48 patches, 576 merged tokens): FlopCounterMode's parts,
    the architecture's FLOPs by hand, and `vtdsl check`'s baseline agree part by part."""
    spec = get_spec("qwen3-vl-8b")
    parts, text = _meta_prefill_parts(spec.build(device="meta", attn_implementation="eager"), side=48)
    n, d, ffn, m = 2304, 1152, 4304, 576
    block = 2 * n * (4 * d * d + 2 * d * ffn) + 4 * d * n * n  # qkv, proj, fc1, fc2; QK^T and AV over all n
    merger = 2 * m * (4608 * 4608 + 4608 * 4096)
    big_n, h = m + text, 4096
    layer = 2 * big_n * (2 * h * 4096 + 2 * h * 1024 + 3 * h * 12288) + 4 * big_n * big_n * 4096
    by_hand = {"vit": 2 * n * 1536 * d + 27 * block + 3 * merger, "projector": merger, "llm": 36 * layer,
               "lm_head": 2 * h * 151936}
    assert parts == by_hand
    report = estimate(check("at llm.layer2 keep text top 50%", spec), text_tokens=text, logits="last")
    assert report.baseline.by_part() == {**by_hand, "scorers": 0}


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at llm.layer1 keep text top 32; at llm.layer3 keep text top 8",
])
def test_compiled_flops_equal_the_cost_model_part_by_part(models, src):
    """The compiled tiny model's forward by module (the vision tower with its DeepStack
    mergers, the merger, the LLM with the stages' scores, lm_head on every row)."""
    got = qwen_prefill_parts(models["eager"], src, inputs(1))
    want = estimate(check(src, SPEC), text_tokens=8, logits="all").policy.by_part()
    # the LLM stages' scores run inside the LLM
    assert got == {"vit": want["vit"], "projector": want["projector"], "llm": want["llm"] + want["scorers"],
                   "lm_head": want["lm_head"]}


# ---------------------------------------------------------------------------- LLM stages
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_generate_matches_masked_reference(models, attn, batch):
    """`keep text top 50%` at llm.layer2 (before DeepStack's injection after layer 2): the
    scores read Qwen3's per-head q/k norms, the kept rows get their own features."""
    model = models[attn]
    assert_fastv_matches_masked_reference(model, plain_copy(SPEC, model), inputs(batch), IMG, N_IMG)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_stage_before_two_injections_generates_as_the_masked_reference(models, attn):
    """At llm.layer1, two DeepStack injections (after layers 1 and 2) land on pruned rows."""
    model = models[attn]
    batch_inputs = inputs(2, seed=7)
    kept, want = top_k_reference(plain_copy(SPEC, model), batch_inputs, IMG, 20, layer=1, new_tokens=6)
    got, kept_got = compiled_generate(model, "at llm.layer1 keep text top 20", batch_inputs, "llm.layer1#0", 6)
    assert torch.equal(kept_got, kept) and torch.equal(got, want)


def _masked_last_logits(ref, batch_inputs: dict, pruned: list[torch.Tensor], from_layer: int,
                        shift: int = 0) -> torch.Tensor:
    """The plain model's last-row logits with `pruned[b]` masked out of every attention from
    LLM layer `from_layer` on. `shift` != 0 rolls the DeepStack features by that many
    visual tokens before they are added: the misalignment a wrong gather would cause."""
    def hook(module, args, kwargs):
        m = kwargs["attention_mask"].expand(len(pruned), -1, -1, -1).clone()
        for b, cols in enumerate(pruned):
            m[b, :, :, cols] = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
        kwargs["attention_mask"] = m
        return args, kwargs

    text = ref.model.language_model
    original = text._deepstack_process
    if shift:
        text._deepstack_process = lambda h, mask, feats: original(h, mask, feats.roll(shift, 0))
    layers = llm_layers(ref)
    hooks = [layers[j].register_forward_pre_hook(hook, with_kwargs=True) for j in range(from_layer, len(layers))]
    try:
        with torch.no_grad():
            return ref(**batch_inputs).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
        text.__dict__.pop("_deepstack_process", None)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer, k", [(0, 16), (1, 20), (2, 32)])
def test_pruning_keeps_the_injected_features_of_the_kept_tokens_aligned(models, attn, layer, k):
    """A stage at llm.layer0/1/2 (before the last injection, after llm.layer2): the compiled
    model's last-row logits equal the masked reference's, where the plain model adds each
    token its own feature (at llm.layer0 the kept rows also keep all three M-RoPE streams);
    adding the features one visual token off moves the logits far more than the tolerance,
    so a misaligned gather could not pass. The reference's scores are eager attention."""
    model = models[attn]
    ref = plain_copy(SPEC, model)
    batch_inputs = inputs(2, seed=11)
    ids = batch_inputs["input_ids"]
    if layer == 0:  # `uniform k`: ranks floor(i·n/k)
        rows = [(ids[b] == IMG).nonzero().flatten() for b in range(2)]
        pruned = [r[~torch.isin(r, r[[i * N_IMG // k for i in range(k)]])] for r in rows]
        src = f"at llm.layer0 keep uniform {k}"
    else:
        att = last_query_attention(ref, batch_inputs, layer - 1)
        _, pruned = prune_to_top(att, ids, IMG, k)
        src = f"at llm.layer{layer} keep text top {k}"
    want = _masked_last_logits(ref, batch_inputs, pruned, layer)
    with vc.apply(src, model), torch.no_grad():
        got = model(**batch_inputs).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    off = _masked_last_logits(ref, batch_inputs, pruned, layer, shift=1)
    assert (off - want).abs().max() > 1e-2


def test_the_deepstack_override_is_listed_and_undone(models):
    model = models["eager"]
    text = model.model.language_model
    with vc.apply("at llm.layer1 keep text top 20", model):
        assert "_deepstack_process" in text.__dict__
        assert "DeepStack" in vc.compiled(model).listing.text()
    assert "_deepstack_process" not in text.__dict__
    with vc.apply("at llm.layer3 keep text top 20", model):  # after every injection: nothing to align
        assert "_deepstack_process" not in text.__dict__


def test_an_image_of_another_size_runs_the_plan_checked_for_it(models):
    """A 192x192 image (12x12 patches, 36 merged tokens) keeps 18 at `top 50%`."""
    model = models["eager"]
    with vc.apply("at llm.layer2 keep text top 50%", model), torch.no_grad():
        model(**inputs(1, side=12, seed=6))
        assert vc.kept_counts(model)["llm"]["llm.layer2#0"] == (36, 18)


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("src, at, code, words", [
    ("at llm.layer2 keep cls@vit.layer3 top 20", "cls@", "no-cls", "has no CLS token"),
    ("at llm.layer1 pool 2x2", "pool", "model-layout", "the pool at llm.layer1 hands on merged tokens"),
    ("at llm.layer1 keep text top 20 then merge rest into 4", "keep", "model-layout", "llm.layer3 or later"),
    ("at llm.layer2 keep text top 20 renumber", "renumber", "renumber", "M-RoPE"),
])
def test_refusals_are_located_and_say_why(src, at, code, words):
    d = first_error(src, SPEC)
    assert (d.span.line, d.span.column, d.code) == (1, src.index(at) + 1, code)
    assert words in d.message + (d.expected or "")


def test_a_merge_after_the_last_injection_runs(models):
    model = models["eager"]
    with vc.apply("at llm.layer3 pool 2x2", model), torch.no_grad():
        model(**inputs(1))
        assert vc.kept_counts(model)["llm"]["llm.layer3#0"] == (64, 16)


def test_a_compiled_model_refuses_video_inputs(models):
    model, vid = models["eager"], SPEC.config().video_token_id
    ids = torch.tensor([[5, 6, 7, 251] + [vid] * 64 + [252, 8, 9, 10]])
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                pixel_values_videos=torch.randn(256, 1536), video_grid_thw=torch.tensor([[1, 16, 16]]),
                mm_token_type_ids=(ids == vid).int() * 2)
    with vc.apply("at llm.layer2 keep text top 50%", model):
        with pytest.raises(vc.CompileError, match="image inputs only"):
            model.generate(**call)
