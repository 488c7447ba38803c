"""LLaVA-NeXT-Video (issue 20 item 1): the spec from the published config, image and video
token counts against transformers' own processor, the cost model against FlopCounterMode
on the meta 7B part by part (an anyres image and a 16-frame video), and compiled image
runs of tiny-llava-next-video: LLM stages against a masked reference, ViT stages against
a plain loop over the CLIP layers. Its compiled video runs are in tests/test_frame_video.py.
Expected numbers are computed here from the architecture, not read from vtdsl."""

from __future__ import annotations

import json
import types
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from family_runs import (anyres_inputs, assert_clip_vit_stage_matches, assert_fastv_matches_masked_reference,
                         compiled_prefill_flops)
from plain_refs import flops_per_part, plain_copy, sharpened_pair
from test_models import _independent_llava_params

BIG = "llava-next-video-7b"
SPEC = get_spec("tiny-llava-next-video")
IMG = SPEC.image_token_id
CROP, SIDE = 112, 8  # pixels and patches per crop side
# a 224x224 image: base view (64) + the 2x2 crops' 16x16 map, each row ended by a newline
N_IMG = SIDE * SIDE + 2 * SIDE * (2 * SIDE + 1)
SIZES = [(336, 336), (672, 672), (600, 800), (1080, 1920), (336, 1008), (5000, 300), (767, 1535), (100, 100)]


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def inputs(batch: int):
    return anyres_inputs(SPEC, (2 * CROP, 2 * CROP), batch, seed=3)


# ---------------------------------------------------------------------------- spec and counts
def test_spec_from_the_published_config():
    s = get_spec(BIG)
    assert get_spec("llava-hf/LLaVA-NeXT-Video-7B-hf") is s
    assert (s.family, s.has_cls, s.select_strategy, s.vision_feature_layer) == ("llava-next-video", True, "default",
                                                                                 -2)
    assert (s.vit.layers, s.vit.hidden, s.llm.layers, s.llm.hidden, s.vocab_size) == (24, 1024, 32, 4096, 32064)
    assert (s.image_token_id, s.config().video_token_id) == (32001, 32000)
    assert (s.vit_crops, s.image_tokens) == (5, 576 + 48 * 49)
    # LLaVA-1.5's parameters (the pooler has none) plus the newline vector
    assert s.param_count() == _independent_llava_params(s.config()) + 4096
    assert family_of(s).name == "llava-next-video" and family_of(SPEC).sized_per_image
    assert (SPEC.vit_crops, SPEC.image_tokens) == (5, N_IMG)


def _processor(**extra):
    """LlavaNextVideoProcessor's counting methods on a stand-in (the processor itself needs
    the video processor, hence torchvision)."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next_video.processing_llava_next_video import LlavaNextVideoProcessor

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    proc = types.SimpleNamespace(image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints),
                                 patch_size=14, num_additional_image_tokens=1, vision_feature_select_strategy="default",
                                 video_token="<video>", **extra)
    for name in ("_get_number_of_features", "_get_unpadded_features", "replace_video_token"):
        setattr(proc, name, types.MethodType(getattr(LlavaNextVideoProcessor, name), proc))
    return proc


def test_image_counts_equal_the_processor():
    spec, proc = get_spec(BIG), _processor()
    for height, width in SIZES:
        # the processor's count, less CLS under the "default" strategy (`_expand_image_tokens`)
        assert spec.for_image(height, width).image_tokens == proc._get_number_of_features(height, width, 336, 336) - 1


@pytest.mark.parametrize("frames", [1, 8, 16, 32])
def test_video_counts_equal_the_processor(frames):
    """The processor counts (336/14)² / 4 tokens a 336x336 frame, what the pool leaves."""
    proc = _processor()
    text = proc.replace_video_token({"pixel_values_videos": [np.zeros((frames, 3, 336, 336), np.float32)]}, 0)
    video = get_spec(BIG).for_video(frames, 720, 1280)
    assert video.image_tokens == text.count("<video>") == frames * 144
    assert (video.vit_crops, video.vit_tokens, video.projector_tokens) == (frames, 577, frames * 144)


def test_counts_equal_the_models_own_features():
    model = SPEC.build(device="cpu", seed=0)
    for size in [(224, 224), (112, 112), (90, 200), (200, 60)]:
        spec = SPEC.for_image(*size)
        px = torch.randn(1, spec.vit_crops, 3, CROP, CROP)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=px, image_sizes=torch.tensor([list(size)]),
                                                   vision_feature_select_strategy="default").pooler_output
        assert feats[0].shape[0] == spec.image_tokens, size


# ---------------------------------------------------------------------------- cost on the meta 7B
def _meta_parts(model, **call) -> tuple[dict, int]:
    check_off = mock.patch("transformers.models.llava_next_video.modeling_llava_next_video.torch_compilable_check",
                           lambda *a, **k: None, create=True)
    with check_off, torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**call, logits_to_keep=1)
    return flops_per_part(model, counter), counter.get_total_flops()


D, FFN, H, MLP, V = 1024, 4096, 4096, 11008, 32064


def _vit(n: int) -> int:  # one crop: patch conv on n - 1 patches, 24 CLIP layers on n tokens
    return 2 * (n - 1) * 3 * 14 * 14 * D + 24 * (2 * n * (4 * D * D + 2 * D * FFN) + 4 * n * n * D)


def _llm(n: int) -> int:
    return 32 * (2 * n * (4 * H * H + 3 * H * MLP) + 4 * n * n * H)


def test_image_cost_of_the_7b_equals_flop_counter_on_meta_part_by_part():
    spec = get_spec(BIG)
    model = spec.build(device="meta", attn_implementation="eager")
    text = 64
    ids = torch.cat([torch.full((1, 2928), IMG_BIG := spec.image_token_id), torch.ones(1, text, dtype=torch.long)], 1)
    px = torch.zeros(1, 5, 3, 336, 336, device="meta", dtype=model.dtype)
    parts, total = _meta_parts(model, input_ids=ids.to("meta"), pixel_values=px,
                               image_sizes=torch.tensor([[672, 672]]))
    assert IMG_BIG == 32001
    want = {"vit": 5 * _vit(577), "projector": 2 * 5 * 576 * (D * H + H * H), "llm": _llm(2928 + text),
            "lm_head": 2 * H * V}
    assert parts == want and total == sum(want.values())
    assert estimate(check("at llm.layer2 keep text top 50%", spec), text_tokens=text,
                    logits="last").baseline.by_part() == {**want, "scorers": 0}


def test_video_cost_of_the_7b_equals_flop_counter_on_meta_part_by_part():
    """16 frames of 336x336: CLIP on each frame's 577 tokens, the average pool (no FLOPs)
    leaving 144 of its 576 patches, the projector on those, the LLM on 2304 + 64 tokens."""
    spec = get_spec(BIG).for_video(16, 336, 336)
    model = spec.build(device="meta", attn_implementation="eager")
    text, frames = 64, 16
    ids = torch.cat([torch.full((1, frames * 144), 32000), torch.ones(1, text, dtype=torch.long)], 1)
    px = torch.zeros(1, frames, 3, 336, 336, device="meta", dtype=model.dtype)
    parts, total = _meta_parts(model, input_ids=ids.to("meta"), pixel_values_videos=px)
    want = {"vit": frames * _vit(577), "projector": 2 * frames * 144 * (D * H + H * H),
            "llm": _llm(frames * 144 + text), "lm_head": 2 * H * V}
    assert parts == want and total == sum(want.values())
    report = estimate(check("at llm.layer2 keep text top 50%", spec), text_tokens=text, logits="last")
    assert report.baseline.by_part() == {**want, "scorers": 0}
    assert report.llm_visual[:2] == [2304, 2304] and report.llm_visual[2:] == [1152] * 30


def test_cli_check_counts_a_video_and_an_image():
    from click.testing import CliRunner

    from vtdsl.cli import main

    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", BIG, "--video", "16x336x336", "--json"])
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert (payload["visual_tokens_to_llm"], payload["crops"], payload["video_frames"]) == (2304, 16, 16)
    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "-m", BIG, "--image", "672x672", "--json"])
    assert run.exit_code == 0 and json.loads(run.stdout)["visual_tokens_to_llm"] == 2928


# ---------------------------------------------------------------------------- compiled images
@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at vit.layer2 keep cls top 8",
    "at llm.layer1 keep text top 40 per crop",
])
def test_compiled_image_flops_equal_the_cost_model(models, src):
    flops = compiled_prefill_flops(models["eager"], src, inputs(1))
    assert flops == estimate(check(src, SPEC), text_tokens=6, logits="all").flops


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_on_an_image_generates_as_the_masked_reference(models, attn, batch):
    model = models[attn]
    assert_fastv_matches_masked_reference(model, plain_copy(SPEC, model), inputs(batch), IMG, N_IMG)


def test_vit_stage_prunes_every_crop_and_generate_follows(models):
    model = models["eager"]
    assert_clip_vit_stage_matches(model, plain_copy(SPEC, model), inputs(2), IMG, crops=5)
