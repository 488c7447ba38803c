"""Video on the families that pool each frame (issue 20 item 1): LLaVA-OneVision (frames
at the tower's size, projected, resized bilinearly to half the grid's sides rounded up, one
newline token after the last frame) and LLaVA-NeXT-Video (frames at the tower's size,
average-pooled 2x2 before the projector, no newline). Counts against transformers' own processor and
`get_video_features`, the cost model against FlopCounterMode on the meta 7Bs part by part,
compiled LLM stages against the uncompiled model with pruned positions masked out. The
expected numbers are computed here from the architecture, not read from vtdsl."""

from __future__ import annotations

import json
import types

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang.errors import PolicyError
from vtdsl.models import get_spec

from family_runs import assert_decode_selection_matches, compiled_generate, compiled_prefill_flops
from plain_refs import (first_error, last_query_attention, left_padded, masked_generate, plain_copy,
                        sharpened_pair, top_k_reference, top_rows)

NAMES = ("tiny-llava-onevision", "tiny-llava-next-video")
FRAMES = 6


def per_frame(name: str) -> int:
    """Tokens one frame gives the LLM, from the tiny configs: OneVision's 56-pixel SigLIP
    frame is 4x4 patches, resized to ceil(4 / 2)² = 4; NeXT-Video's 112-pixel CLIP frame is
    8x8 patches (CLS dropped), average-pooled to 4x4 = 16."""
    return {"tiny-llava-onevision": 4, "tiny-llava-next-video": 16}[name]


def newline(name: str) -> int:
    return {"tiny-llava-onevision": 1, "tiny-llava-next-video": 0}[name]


def video_tokens(name: str, frames: int = FRAMES) -> int:
    return frames * per_frame(name) + newline(name)


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    spec = get_spec(request.param)
    return spec, sharpened_pair(spec)


def video_inputs(spec, batch: int, frames: int = FRAMES, seed: int = 4) -> dict:
    """One video of `frames` random frames per prompt, as many placeholders as the
    processor gives it (computed here); batch 2 is left-padded with id 0."""
    vid = spec.config().video_token_id
    n = video_tokens(spec.name, frames)
    rows = [[5, 6, 7] + [vid] * n + [8, 9, 10]]
    if batch == 2:
        rows.append([11, 12, 13, 14, 15] + [vid] * n + [18, 19, 20, 21])
    ids, mask = left_padded(rows)
    side = spec.image_size
    px = torch.randn(len(rows), frames, 3, side, side, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=px)


# ---------------------------------------------------------------------------- counts
def _onevision_processor_count(frames: int, height: int, width: int) -> int:
    """transformers' LlavaOnevisionProcessor count for a video (`_get_num_multimodal_tokens`,
    on a stand-in: the processor itself needs the video processor, hence torchvision)."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    proc = types.SimpleNamespace(num_image_tokens=729)
    counts = LlavaOnevisionProcessor._get_num_multimodal_tokens(proc, video_sizes=[(frames, height, width)])
    return counts["num_video_tokens"][0]


@pytest.mark.parametrize("frames, height, width", [(1, 384, 384), (16, 384, 384), (8, 480, 640), (32, 1080, 1920),
                                                   (3, 100, 5000)])
def test_onevision_video_counts_equal_the_processor(frames, height, width):
    video = get_spec("llava-onevision-7b").for_video(frames, height, width)
    assert video.image_tokens == _onevision_processor_count(frames, height, width) == frames * 14 * 14 + 1
    assert (video.vit_crops, video.video_frames, video.vit_tokens, video.projector_tokens) == (
        frames, frames, 729, frames * 729)  # the projector runs before the resize


def test_counts_equal_the_models_own_video_features(family):
    spec, models = family
    for frames in (1, 2, 5):
        px = torch.randn(2, frames, 3, spec.image_size, spec.image_size)
        with torch.no_grad():
            feats = models["eager"].model.get_video_features(pixel_values_videos=px).pooler_output
        assert feats.shape[:2] == (2, video_tokens(spec.name, frames))
        assert spec.for_video(frames, spec.image_size, spec.image_size).image_tokens == feats.shape[1]


def test_the_call_layout_counts_as_check_video_does(family):
    spec, _ = family
    called = family_of(spec).video_spec(spec, {"pixel_values_videos": video_inputs(spec, 1)["pixel_values_videos"]})
    assert called == spec.for_video(FRAMES, 720, 1280) and called.image_tokens == video_tokens(spec.name)
    with pytest.raises(vc.CompileError, match=r"expected \[batch, frames, channels, height, width\]"):
        family_of(spec).video_spec(spec, {"pixel_values_videos": torch.zeros(FRAMES, 3, 56, 56)})


# ---------------------------------------------------------------------------- cost
def test_onevision_video_cost_equals_flop_counter_on_meta_part_by_part():
    """16 frames of 384x384 on the 7B: SigLIP on each frame's 729 patches, the projector on
    them, the LLM on 16·196 + 1 video tokens and 64 text tokens, lm_head on the last row;
    the bilinear resize counts nothing."""
    from test_llava_onevision import meta_7b_parts, onevision_7b_parts

    spec = get_spec("llava-onevision-7b").for_video(16, 384, 384)
    text, frames = 64, 16
    ids = torch.cat([torch.full((1, frames * 196 + 1), 151647), torch.ones(1, text, dtype=torch.long)], 1)
    parts, total = meta_7b_parts(input_ids=ids, pixel_values_videos=torch.zeros(1, frames, 3, 384, 384))
    want = onevision_7b_parts(frames, frames * 196 + 1 + text)
    assert parts == want and total == sum(want.values())
    report = estimate(check("at llm.layer2 keep text top 50%", spec), text_tokens=text, logits="last")
    assert report.baseline.by_part() == {**want, "scorers": 0}
    assert report.llm_visual[:2] == [3137, 3137] and report.llm_visual[2:] == [1569] * 26


def test_cli_check_counts_a_onevision_video():
    from click.testing import CliRunner

    from vtdsl.cli import main

    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "--model", "llava-onevision-7b", "--video",
                                    "16x384x384", "--json"])
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert (payload["visual_tokens_to_llm"], payload["crops"], payload["video_frames"]) == (16 * 196 + 1, 16, 16)
    run = CliRunner().invoke(main, ["check", "policies/fastv.vt", "--model", "llava-onevision-7b", "--video",
                                    "16x384x384"])
    assert run.exit_code == 0 and "video: 16 frames, ViT counts per frame" in run.output


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at llm.layer0 keep uniform 10; at llm.layer2 keep text top 2 per frame",
])
def test_compiled_video_flops_equal_the_cost_model(family, src):
    spec, models = family
    flops = compiled_prefill_flops(models["eager"], src, video_inputs(spec, 1))
    side = spec.image_size
    assert flops == estimate(check(src, spec.for_video(FRAMES, side, side)), text_tokens=6, logits="all").flops


# ---------------------------------------------------------------------------- compiled LLM stages
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_on_a_video_generates_as_the_masked_reference(family, attn, batch):
    """`keep text top k` at llm.layer2 over the video's placeholders (the newline among
    them): the positions and greedy tokens of the masked reference."""
    spec, models = family
    model, inputs = models[attn], video_inputs(spec, batch)
    k = video_tokens(spec.name) // 2
    kept, want = top_k_reference(plain_copy(spec, model), inputs, spec.config().video_token_id, k, layer=2,
                                 new_tokens=6)
    got, kept_got = compiled_generate(model, f"at llm.layer2 keep text top {k}", inputs, "llm.layer2#0", 6)
    assert torch.equal(kept_got, kept) and torch.equal(got, want)


def frame_of(name: str, i: int) -> int:
    """The frame of the i-th video token: frames one after another, the newline with the
    last frame."""
    return min(i // per_frame(name), FRAMES - 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_per_frame_gives_each_frame_its_share(family, attn):
    """`top 12 per frame`: 2 of each frame's tokens (the newline competes in the last
    frame), ranked by the last row's attention at layer 0; generate equals masking the
    others from layer 1 on."""
    spec, models = family
    model, inputs = models[attn], video_inputs(spec, 2)
    ref = plain_copy(spec, model)
    att = last_query_attention(ref, inputs, 0)
    ids, vid = inputs["input_ids"], spec.config().video_token_id
    frame = torch.tensor([frame_of(spec.name, i) for i in range(video_tokens(spec.name))])
    kept, pruned = [], []
    for b in range(2):
        rows = (ids[b] == vid).nonzero().flatten()
        chosen = torch.cat([top_rows(att[b], rows[frame == f], 2) for f in range(FRAMES)]).sort().values
        kept.append(chosen)
        pruned.append(rows[~torch.isin(rows, chosen)])
    want = masked_generate(plain_copy(spec, model, attn), inputs, pruned, from_layer=1, new_tokens=5)
    with vc.apply("at llm.layer1 keep text top 12 per frame", model), torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["llm.layer1#0"], torch.stack(kept))
    assert torch.equal(got, want)
    # the per-frame split differs from a plain top 12 here (otherwise the test proves nothing)
    plain = torch.stack([top_rows(att[b], (ids[b] == vid).nonzero().flatten(), 12) for b in range(2)])
    assert not torch.equal(plain, torch.stack(kept))


def test_a_video_of_another_length_runs_the_plan_checked_for_it(family):
    spec, models = family
    n = video_tokens(spec.name, 3)
    with vc.apply("at llm.layer2 keep text top 50%", models["eager"]), torch.no_grad():
        models["eager"](**video_inputs(spec, 1, frames=3, seed=7))
        assert vc.kept_counts(models["eager"])["llm"]["llm.layer2#0"] == (n, (n + 1) // 2)  # halves round up


def test_images_still_run_their_own_plan_after_a_video(family):
    """The compiled model keeps one plan per layout: an image call after a video call
    prunes the image's packed tokens (per frame is refused on an image)."""
    from family_runs import anyres_inputs

    spec, models = family
    model = models["eager"]
    image = anyres_inputs(spec, (spec.image_size, spec.image_size), 1, 3)
    n_img = spec.for_image(spec.image_size, spec.image_size).image_tokens
    with vc.apply("at llm.layer2 keep text top 50%", model), torch.no_grad():
        model(**video_inputs(spec, 1))
        model(**image)
        assert vc.kept_counts(model)["llm"]["llm.layer2#0"] == (n_img, n_img // 2)
    with vc.apply("at llm.layer2 keep text top 2 per frame", model), torch.no_grad():
        with pytest.raises(vc.CompileError, match="per frame"):
            model(**image)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_selection_on_a_video_equals_the_step_by_step_reference(family, attn):
    """`during decode at llm.layer2 attend top 8` picks among the video's rows (found by
    `video_token_id`, OneVision's newline among them): generate's scores equal the masked
    reference step by step."""
    spec, models = family
    model = models[attn]
    assert_decode_selection_matches(model, plain_copy(spec, model), video_inputs(spec, 2),
                                    spec.config().video_token_id, keep=8)


# ---------------------------------------------------------------------------- refusals
def test_vit_stages_and_scores_are_refused_on_a_video(family):
    spec, _ = family
    video = spec.for_video(FRAMES, 720, 1280)
    src = "at vit.layer2 keep knorm@vit.layer1 top 8"
    d = first_error(src, video)
    assert (d.span.line, d.span.column) == (1, 4) and "pools each video frame's whole" in d.message
    src = "at llm.layer2 keep knorm@vit.layer1 top 8"
    d = first_error(src, video)
    assert d.span.column == src.index("knorm") + 1 and "vtdsl reads no ViT scores on a video" in d.message


def test_a_compiled_model_with_vit_stages_refuses_video_calls(family):
    spec, models = family
    with vc.apply("at vit.layer2 keep knorm@vit.layer1 top 8", models["eager"]), torch.no_grad():
        with pytest.raises(vc.CompileError, match="refuses pixel_values_videos"):
            models["eager"](**video_inputs(spec, 1))


def test_merge_static_is_refused_on_a_video_with_a_newline_only():
    src = "at llm.layer0 merge static 2 per window 2"
    d = first_error(src, get_spec("llava-onevision-7b").for_video(16, 384, 384))
    assert d.span.column == src.index("merge") + 1 and "newline token that has no place in a frame" in d.message
    plan = check(src, get_spec("llava-next-video-7b").for_video(16, 336, 336))
    assert plan.llm_visual[0] == 16 * 144 - 8 * 2  # each window's second frame loses 2 tokens


def test_spatial_llm_stages_on_a_video_are_refused():
    with pytest.raises(PolicyError, match="not one token grid"):
        check("at llm.layer2 pool 2x2", get_spec("llava-onevision-7b").for_video(16, 384, 384))
