"""Qwen2.5-VL: spec from the published config, cost = FlopCounterMode (window attention,
2x2 merger, M-RoPE LLM), check-time refusals, and compiled tiny-qwen2.5-vl runs against
plain references written here (the uncompiled model with pruned positions masked out)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.cost import estimate, estimate_counts
from vtdsl.ir import check
from vtdsl.lang.errors import PolicyError
from vtdsl.models import get_spec

from plain_refs import (plain_copy, first_error, masked_generate, mrope_inputs, prune_to_top, qwen_7b_merger_llm_flops,
                        qwen_meta_prefill_flops, sharpened_pair)

from family_runs import assert_fastv_matches_masked_reference, compiled_prefill_flops

SPEC = get_spec("tiny-qwen2.5-vl")
IMG, START, END = 250, 251, 252
SIDE = 16  # 224 px / 14: patches per side of the reference image
N_IMG = (SIDE // 2) ** 2  # 64 merged tokens
ZOO = sorted((Path(__file__).resolve().parents[1] / "policies").glob("*.vt"))


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def inputs(batch: int):
    """One 224x224 image per prompt, wrapped in vision start/end; batch 2 is left-padded."""
    return mrope_inputs(batch, SIDE)


def fresh_copy(model, attn="eager"):
    return plain_copy(SPEC, model, attn)


# ---------------------------------------------------------------------------- spec and cost
def test_spec_from_the_published_config():
    s = get_spec("qwen2.5-vl-7b")
    assert (s.family, s.has_cls, s.spatial_merge, s.temporal_patch, s.position_encoding) == (
        "qwen2.5-vl", False, 2, 2, "mrope")
    assert (s.vit.layers, s.vit.hidden, s.vit.ffn, s.vit.heads, s.vit.mlp) == (32, 1280, 3420, 16, "swiglu")
    assert (s.llm.layers, s.llm.hidden, s.llm.heads, s.llm.kv_heads, s.llm.ffn) == (28, 3584, 28, 4, 18944)
    assert s.vit_window == 8 * 8 and s.vit_full_attention == (7, 15, 23, 31)
    # 672x672: 48x48 patches in the ViT, one LLM token per 2x2
    assert (s.vit_tokens, s.image_tokens, s.projector) == (48 * 48, 24 * 24, (5120, 5120, 3584))
    assert s.param_count() == 8_292_166_656  # Qwen2.5-VL-7B's published size (8.29 B)


def test_cost_of_qwen25_vl_7b_equals_flop_counter_on_meta():
    """The prefill at 672x672 (48x48 patches), counted by FlopCounterMode
    (`plain_refs.qwen_meta_prefill_flops`), against the architecture's FLOPs by hand."""
    spec = get_spec("qwen2.5-vl-7b")
    flops, text = qwen_meta_prefill_flops(spec.build(device="meta", attn_implementation="eager"), side=48)
    n, d, ffn = 2304, 1280, 3420
    linear = 2 * n * (4 * d * d + 3 * d * ffn)
    windows = 36 * 64 * 64  # 6x6 windows of 8x8 patches: attention within each
    vit = 2 * n * 1176 * d + 28 * (linear + 4 * d * windows) + 4 * (linear + 4 * d * n * n)
    independent = vit + qwen_7b_merger_llm_flops(text)
    assert flops == independent
    assert estimate_counts(spec, [n] * 32, 576, [576] * 28, text).baseline.flops == independent


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at llm.layer0 pool 2x2; at llm.layer2 keep text top 5",
    "at llm.layer1 keep text top 16 per region 2x2",
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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llm_layer0_gathers_all_three_position_streams(models, attn):
    """A prune before the LLM removes rows from the sequence; kept tokens must keep their
    (t, h, w) M-RoPE positions: the same as masking the dropped rows everywhere."""
    model = models[attn]
    batch_inputs = inputs(2)
    ids = batch_inputs["input_ids"]
    pruned = []
    for b in range(2):
        rows = (ids[b] == IMG).nonzero().flatten()
        chosen = rows[[i * N_IMG // 20 for i in range(20)]]  # `uniform 20`: ranks floor(i·n/k)
        pruned.append(rows[~torch.isin(rows, chosen)])
    want = masked_generate(fresh_copy(model, attn), batch_inputs, pruned, from_layer=0, new_tokens=6)
    with vc.apply("at llm.layer0 keep uniform 20", model):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    # and gathering only the text stream (1-D positions) would not be the same model
    with torch.no_grad():
        flat = fresh_copy(model, attn).generate(**{k: v for k, v in batch_inputs.items() if k != "mm_token_type_ids"},
                                                max_new_tokens=6, do_sample=False)
    assert not torch.equal(flat, want)


# ---------------------------------------------------------------------------- check time
@pytest.mark.parametrize("src, at, code, words", [
    ("at llm.layer2 keep cls@vit.layer3 top 20", "cls@", "no-cls", "qwen2.5-vl's vision tower has no CLS token"),
    ("at vit.out keep cls_token + attn@vit.layer2 top 20", "cls_token", "cls-token", "has no CLS token"),
    # ViT counts are merge units (the 64 LLM tokens of a 224-pixel image), not its 256 patches
    ("at vit.layer2 keep random 100", "100", "quantity", "64"),
    ("at llm.layer2 keep text top 20 renumber", "renumber", "renumber", "M-RoPE"),
])
def test_refusals_are_located_and_say_why(src, at, code, words):
    d = first_error(src, SPEC)
    assert (d.span.line, d.span.column, d.code) == (1, src.index(at) + 1, code)
    assert words in d.message + (d.expected or "")


def test_zoo_on_qwen25_vl_7b_compiles_or_is_refused_with_a_reason():
    spec = get_spec("qwen2.5-vl-7b")
    model = spec.build(device="meta")
    ok, refused = [], {}
    for path in ZOO:
        try:
            plan = check(path, spec)
        except PolicyError as err:
            refused[path.stem] = err.diagnostics[0].code
            continue
        ok.append(path.stem)
        with vc.apply(plan, model):  # installs on the full-size module tree
            mechanism = vc.compiled(model).listing.mechanism
            assert mechanism["llm"] == "hooks"  # ViT stages drop units' rows at the LLM input
            assert mechanism["vit"] == ("forward" if any(s.site.tower == "vit" for s in plan.stages) else "none")
    # LLM-only policies without re-numbering run unchanged; ViT-side ones on merge units
    assert {"fastv", "dart", "feather", "dyvte", "pool", "tome", "hiprune", "vflowopt"} <= set(ok)
    assert refused["pdrop"] == "renumber" and refused["visionzip"] == "cls-token"
    assert refused["flowcut"] == "no-cls" and refused["holov"] == "no-cls"
    assert all(code in ("renumber", "cls-token", "no-cls", "site-range") for code in refused.values())


def test_an_image_of_another_size_runs_the_plan_checked_for_it(models):
    """Dynamic resolution: a 224x168 image (16x12 patches, 48 tokens) keeps 24 at `top 50%`,
    and a 2x2 pool at llm.layer0 pools its own 8x6 merged grid."""
    model = models["eager"]
    h, w = 16, 12
    ids = torch.tensor([[5, 6, 7, START] + [IMG] * (h * w // 4) + [END, 8, 9, 10]])
    batch_inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=torch.randn(h * w, 1176, generator=torch.Generator().manual_seed(6)),
                        image_grid_thw=torch.tensor([[1, h, w]]), mm_token_type_ids=(ids == IMG).int())
    ref = fresh_copy(model)
    with torch.no_grad():
        att = ref(**batch_inputs, output_attentions=True).attentions[1][:, :, -1, :].mean(1)
    kept, pruned = prune_to_top(att, ids, IMG, 24)
    want = masked_generate(ref, batch_inputs, pruned, from_layer=2, new_tokens=5)
    with vc.apply("at llm.layer2 keep text top 50%", model):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"], kept)
    assert torch.equal(got, want)
    with vc.apply("at llm.layer0 pool 2x2", model):
        with torch.no_grad():
            model(**batch_inputs)
        assert vc.kept_counts(model)["llm"]["llm.layer0#0"] == (48, 4 * 3)


def test_cli_check_counts_at_the_image_size_the_processor_makes():
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "qwen2.5-vl-7b", "--image", "600x800",
                                    "--json"])
    assert run.exit_code == 0, run.output
    # the processor rounds 600x800 to 588x812 (multiples of 28): 21 x 29 merged tokens
    assert json.loads(run.stdout)["visual_tokens_to_llm"] == 21 * 29


@pytest.mark.parametrize("height, width", [(196, 252), (84, 84)])
def test_cost_counts_partial_attention_windows(models, height, width):
    """Sides that are not whole windows leave partial windows at the bottom and right:
    the cost model sums their squares, as the windowed attention computes them."""
    model = models["eager"]
    h, w = height // 14, width // 14
    ids = torch.tensor([[5, 6, 7, START] + [IMG] * (h * w // 4) + [END, 8, 9, 10]])
    batch_inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=torch.randn(h * w, 1176), image_grid_thw=torch.tensor([[1, h, w]]),
                        mm_token_type_ids=(ids == IMG).int())
    src = "at llm.layer2 keep text top 50%"
    with vc.apply(src, model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch_inputs)
    spec = SPEC.for_image(height, width)
    merged_rows, merged_cols = h // 2, w // 2  # windows: 2x2 merged tokens = 4x4 patches
    runs = lambda n: [2] * (n // 2) + [n % 2] * (n % 2)  # noqa: E731
    assert spec.vit_window_pairs == sum((a * b * 4) ** 2 for a in runs(merged_rows) for b in runs(merged_cols))
    assert counter.get_total_flops() == estimate(check(src, spec), text_tokens=8, logits="all").flops


# ---------------------------------------------------------------------------- image sizes
# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json: the processor's pixel range
HUB_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}
SWEEP = [(28, 28), (1, 1), (14, 14), (56, 56), (57, 55), (224, 224), (600, 800), (673, 671), (1000, 3000),
         (3584, 3584), (3585, 3583), (28000, 28000), (28001, 27999), (20000, 100), (28, 5600), (5600, 28),
         (14, 2800), (4032, 3024)]


def _processor(**kwargs):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, **kwargs)


def _merged_tokens(processor, height, width):
    return processor.get_number_of_image_patches(height, width, {}) // 4


def test_visual_tokens_for_any_image_size_equal_the_processor():
    """`for_image` counts what Qwen2VLImageProcessor makes of an image of that size:
    tiny (raised to min_pixels), huge (brought under max_pixels), sides that are not
    multiples of 28, extreme aspect ratios; beyond 200:1 both refuse."""
    spec, processor = get_spec("qwen2.5-vl-7b"), _processor(**HUB_PIXELS)
    for height, width in SWEEP:
        assert spec.for_image(height, width).image_tokens == _merged_tokens(processor, height, width), (height, width)
    # the figures, by hand: 12845056 / 28^2 = 16384 merged tokens at most,
    # 3136 / 28^2 = 4 at least
    assert spec.for_image(28000, 28000).image_tokens == 16384
    assert spec.for_image(28, 28).image_tokens == 4
    with pytest.raises(ValueError, match="aspect ratio"):
        _merged_tokens(processor, 10, 3000)
    with pytest.raises(ValueError, match="aspect ratio"):
        spec.for_image(10, 3000)


def test_the_processor_counts_real_images_as_it_counts_sizes():
    """The sweep's reference (`get_number_of_image_patches`) agrees with the processor run
    on images (image_grid_thw), so the sizes test compares with what inference sees."""
    import numpy as np

    processor = _processor(**HUB_PIXELS)
    spec = get_spec("qwen2.5-vl-7b")
    for height, width in [(28, 28), (57, 55), (600, 800), (28, 1400), (3585, 3583)]:
        image = np.zeros((height, width, 3), dtype=np.uint8)
        t, rows, cols = processor(images=image, return_tensors="pt")["image_grid_thw"][0].tolist()
        assert (t, rows * cols // 4) == (1, _merged_tokens(processor, height, width))
        assert spec.for_image(height, width).image_grid == (rows, cols)


def test_the_pixel_range_is_the_checkpoints_own(tmp_path):
    """A model directory's preprocessor_config.json sets the range (saved by the processor
    itself); without one, transformers' processor defaults (28*28*1280 at most)."""
    import json

    from vtdsl.models.builtins import builtin_config_dict

    config = builtin_config_dict("qwen2.5-vl-7b")
    del config["vtdsl_preprocessor"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    defaults = _processor()
    bare = get_spec(str(tmp_path))
    for height, width in [(28000, 28000), (28, 28), (1000, 3000)]:
        assert bare.for_image(height, width).image_tokens == _merged_tokens(defaults, height, width)
    # by hand: a square of 28*28*1280 pixels is 1001.8 px a side, floored to 980 = 35 * 28
    assert bare.for_image(28000, 28000).image_tokens == 35 * 35
    narrow = _processor(min_pixels=256 * 28 * 28, max_pixels=512 * 28 * 28)
    narrow.save_pretrained(tmp_path)
    own = get_spec(str(tmp_path))
    assert (own.min_pixels, own.max_pixels) == (256 * 28 * 28, 512 * 28 * 28)
    for height, width in SWEEP[:12]:
        assert own.for_image(height, width).image_tokens == _merged_tokens(narrow, height, width), (height, width)


def test_cli_check_refuses_an_aspect_ratio_the_processor_refuses():
    from click.testing import CliRunner

    from vtdsl.cli import main

    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "qwen2.5-vl-7b", "--image", "10x3000"])
    assert run.exit_code == 2 and "aspect ratio must be smaller than 200" in run.output
    assert "Traceback" not in run.output


def test_a_compiled_model_takes_the_grid_it_is_given(models):
    """A call's image_grid_thw is the processor's output, whatever range that processor
    was set to: the compiled model counts that grid, it does not resize it again (a spec
    whose range stops at 56x56 pixels still runs a 16x12-patch image as 48 tokens)."""
    from dataclasses import replace

    model = models["eager"]
    h, w = 16, 12
    ids = torch.tensor([[5, 6, 7, START] + [IMG] * (h * w // 4) + [END, 8, 9, 10]])
    batch_inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(h * w, 1176),
                        image_grid_thw=torch.tensor([[1, h, w]]), mm_token_type_ids=(ids == IMG).int())
    narrow = replace(SPEC, max_pixels=3136)
    # what resizing again would count: 224x168 scaled by sqrt(3136 / 37632) and floored
    # to multiples of 28 is 56x28, 2x1 merged tokens
    assert narrow.for_image(h * 14, w * 14).image_tokens == 2
    with vc.apply("at llm.layer2 keep text top 50%", model, spec=narrow), torch.no_grad():
        model(**batch_inputs)
        assert vc.kept_counts(model)["llm"]["llm.layer2#0"] == (48, 24)


# ---------------------------------------------------------------------------- video
VIDEO_SWEEP = [(1, 448, 448), (2, 448, 448), (3, 448, 448), (16, 448, 448), (17, 600, 800), (8, 28, 28),
               (4, 1080, 1920), (5, 3000, 1000), (32, 57, 55), (7, 224, 224)]


def _video_tokens_reference(frames, height, width):
    """What Qwen2VLVideoProcessor makes of a video, by its rules: each frame resized like
    an image but in the video processor's pixel range (size shortest_edge 128·28², longest_edge
    768·28²), the frames padded by repeating the last to a multiple of the temporal patch 2.
    The image processor does the per-frame resize; returns (temporal groups, merged tokens)."""
    per_frame = _processor(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    groups = (frames + 1) // 2
    return groups, groups * _merged_tokens(per_frame, height, width)


@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen2-vl-7b"])
def test_visual_tokens_for_any_video_equal_the_video_processor(name):
    """`for_video` counts what the video processor makes: frames in pairs (an odd count
    padded), each pair one crop of the resized frame's grid."""
    spec = get_spec(name)
    for frames, height, width in VIDEO_SWEEP:
        groups, tokens = _video_tokens_reference(frames, height, width)
        video = spec.for_video(frames, height, width)
        assert (video.vit_crops, video.image_tokens) == (groups, tokens), (frames, height, width)
        assert video.vit_tokens * video.vit_crops == tokens * 4  # every patch of every group in the ViT
    # by hand: 448x448 is 32x32 patches, 16x16 merged tokens; 16 frames are 8 pairs
    assert get_spec(name).for_video(16, 448, 448).image_tokens == 8 * 16 * 16
    with pytest.raises(ValueError, match="at least 1 frame"):
        spec.for_video(0, 448, 448)


def _meta_video_prefill_parts(model, groups: int, side: int, video_id: int = 151656) -> tuple[dict, int]:
    """FlopCounterMode of a Qwen-VL prefill on a video prompt, on the meta device, split by
    module: the vision tower (patch embedding and blocks), its merger, the LLM, lm_head.
    The video is `groups` temporal groups of side x side patches; the vision tower is
    called directly as in `plain_refs.qwen_meta_prefill_flops`, the LLM gets the model's
    own M-RoPE ids for a video (token type 2, video_grid_thw)."""
    import transformers.vision_utils as vu

    n_vid = groups * (side // 2) ** 2
    grid = torch.tensor([[groups, side, side]])
    ids = torch.tensor([[9] * 20 + [151652] + [video_id] * n_vid + [151653] + [9] * 42])
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == video_id).int() * 2, video_grid_thw=grid)
    pixels = torch.empty(groups * side * side, 1176, dtype=model.dtype, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vision = model.model.visual(pixels, grid_thw=grid, position_ids=vu.get_vision_position_ids(grid, 2).to("meta"))
        embeds = model.get_input_embeddings()(ids.to("meta"))
        embeds = embeds.masked_scatter((ids == video_id)[..., None].to("meta"), vision.pooler_output)
        model(inputs_embeds=embeds, position_ids=pos.to("meta"), use_cache=False, logits_to_keep=1)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    tower, top = type(model.model.visual).__name__, type(model).__name__
    parts = {"vit": counts[tower] - counts[f"{tower}.merger"], "projector": counts[f"{tower}.merger"],
             "llm": counts[f"{top}.model.language_model"], "lm_head": counts[f"{top}.lm_head"]}
    assert sum(parts.values()) == counter.get_total_flops()
    return parts, ids.shape[1] - n_vid


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-vl-7b", "qwen2-vl-7b"])
def test_video_cost_equals_flop_counter_on_meta_part_by_part(name):
    """5 frames of 448x448: 3 temporal groups (the odd frame padded) of 32x32 patches, each
    attended on its own (windows per group on Qwen2.5-VL); the cost model's baseline parts
    equal FlopCounterMode's, and an LLM-only policy sees the video's 768 tokens."""
    spec = get_spec(name).for_video(5, 448, 448)
    assert (spec.vit_crops, spec.grid, spec.image_tokens) == (3, (32, 32), 3 * 16 * 16)
    parts, text = _meta_video_prefill_parts(spec.build(device="meta", attn_implementation="eager"), 3, 32)
    report = estimate(check("at llm.layer2 keep text top 50%", spec), text_tokens=text, logits="last")
    assert report.baseline.by_part() == {**parts, "scorers": 0}
    assert report.policy.llm < report.baseline.llm and report.llm_visual[:2] == [768, 768]
    assert report.llm_visual[2:] == [384] * 26


def test_cli_check_counts_a_video():
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "qwen2.5-vl-7b", "--video", "16x448x448",
                                    "--json"])
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert (payload["visual_tokens_to_llm"], payload["crops"], payload["video_frames"]) == (8 * 16 * 16, 8, 16)
    for bad, words in [("16x448", "FRAMESxHEIGHTxWIDTH"), ("0x448x448", "FRAMESxHEIGHTxWIDTH"),
                       ("16x10x3000", "aspect ratio")]:
        run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "qwen2.5-vl-7b", "--video", bad])
        assert run.exit_code == 2 and words in run.output, (bad, run.output)
    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "llava-1.5-7b", "--video", "16x448x448"])
    assert run.exit_code == 2 and "takes no video input" in run.output
    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", "qwen2.5-vl-7b", "--video", "16x448x448",
                                    "--image", "448x448"])
    assert run.exit_code == 2 and "exclusive" in run.output


def test_vit_stages_on_a_video_are_refused_as_on_an_image():
    src = "at vit.layer4 keep top 50% by attn_cls"
    with pytest.raises(PolicyError) as image_err:
        check(src, get_spec("qwen2.5-vl-7b"))
    with pytest.raises(PolicyError) as video_err:
        check(src, get_spec("qwen2.5-vl-7b").for_video(16, 448, 448))
    assert str(video_err.value) == str(image_err.value)


def test_spatial_llm_stages_on_a_video_are_refused_with_its_layout():
    """A video's LLM tokens are one grid per temporal group, one after another: a 2x2 pool
    across them would mix frames, so it is refused naming the groups."""
    with pytest.raises(PolicyError, match="8 temporal groups' grids"):
        check("at llm.layer2 pool 2x2", get_spec("qwen2.5-vl-7b").for_video(16, 448, 448))
