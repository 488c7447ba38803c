"""Compiled video on Qwen2-VL / Qwen2.5-VL (issue 20 item 1): LLM stages find a video's
placeholders (`video_token_id`) and run the plan checked for the call's `video_grid_thw`
(temporal groups x merged grid). References are the uncompiled model with pruned
positions masked out (`plain_refs`); FLOPs are FlopCounterMode's."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from plain_refs import (last_query_attention, masked_generate, mrope_inputs, plain_copy, qwen_prompts, sharpened_pair,
                        top_rows)

from family_runs import (assert_decode_selection_matches, assert_fastv_matches_masked_reference,
                         compiled_prefill_flops)

NAMES = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
START, END = 251, 252
GROUPS, SIDE = 2, 16  # two temporal groups (four frames) of 16x16 patches: 2 x 64 merged tokens
N_VID = GROUPS * (SIDE // 2) ** 2


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    spec = get_spec(request.param)
    return spec, sharpened_pair(spec)


def video_inputs(spec, batch: int, groups: int = GROUPS, side: int = SIDE, seed: int = 5) -> dict:
    """One video per prompt between vision start/end, as many placeholders as its groups'
    merged grids hold; batch 2 is left-padded with id 2; random patch pixels."""
    vid = spec.config().video_token_id
    ids, mask = qwen_prompts(batch, [vid] * (groups * (side // 2) ** 2), START, END)
    px = torch.randn(len(ids) * groups * side * side, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=px,
                video_grid_thw=torch.tensor([[groups, side, side]] * len(ids)), mm_token_type_ids=(ids == vid).int() * 2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_on_a_video_generates_as_the_masked_reference(family, attn, batch):
    spec, models = family
    model = models[attn]
    assert_fastv_matches_masked_reference(model, plain_copy(spec, model), video_inputs(spec, batch),
                                          spec.config().video_token_id, N_VID)


def test_llm_layer0_on_a_video_keeps_the_three_position_streams(family):
    """`uniform 20` before the LLM keeps ranks floor(i·n/k) of the video's tokens, each with
    its (t, h, w) M-RoPE positions: the same as masking the others everywhere."""
    spec, models = family
    model, batch_inputs = models["sdpa"], video_inputs(spec, 2)
    ids, vid = batch_inputs["input_ids"], spec.config().video_token_id
    pruned = []
    for b in range(2):
        rows = (ids[b] == vid).nonzero().flatten()
        chosen = rows[[i * N_VID // 20 for i in range(20)]]
        pruned.append(rows[~torch.isin(rows, chosen)])
    want = masked_generate(plain_copy(spec, model, "sdpa"), batch_inputs, pruned, from_layer=0, new_tokens=6)
    with vc.apply("at llm.layer0 keep uniform 20", model), torch.no_grad():
        got = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_per_crop_on_a_video_gives_each_temporal_group_its_share(family):
    """`top 25% per crop` on a video: 16 of each group's 64 tokens, ranked by the last
    row's attention within the group (crops of a video are its temporal groups)."""
    spec, models = family
    model, batch_inputs = models["eager"], video_inputs(spec, 2)
    ids, vid = batch_inputs["input_ids"], spec.config().video_token_id
    att = last_query_attention(plain_copy(spec, model), batch_inputs, 1)
    per_group = N_VID // GROUPS
    want = []
    for b in range(2):
        rows = (ids[b] == vid).nonzero().flatten()
        want.append(torch.cat([top_rows(att[b], rows[g * per_group:(g + 1) * per_group], per_group // 4)
                               for g in range(GROUPS)]))
    with vc.apply("at llm.layer2 keep text top 25% per crop", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"], torch.stack(want))


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at llm.layer0 keep uniform 30; at llm.layer2 keep text top 5",
])
def test_compiled_video_flops_equal_the_cost_model(family, src):
    spec, models = family
    flops = compiled_prefill_flops(models["eager"], src, video_inputs(spec, 1))
    video = family_of(spec).video_spec(spec, {"video_grid_thw": video_inputs(spec, 1)["video_grid_thw"]})
    assert video.image_tokens == N_VID
    assert flops == estimate(check(src, video), text_tokens=8, logits="all").flops


def test_the_call_layout_counts_as_check_video_does(family):
    """A 4-frame 336x336 clip as `vtdsl check --video 4x336x336` counts it (the video
    processor's range) and as its `video_grid_thw` (2 groups of 24x24 patches) gives it."""
    spec, _ = family
    checked = spec.for_video(4, 336, 336)
    called = family_of(spec).video_spec(spec, {"video_grid_thw": torch.tensor([[2, 24, 24]])})
    assert checked == called and called.image_tokens == 2 * 12 * 12


def test_a_video_of_another_layout_runs_the_plan_checked_for_it(family):
    """Three groups of 12x12 patches (3 x 36 merged tokens) keep 54 at `top 50%`."""
    spec, models = family
    with vc.apply("at llm.layer2 keep text top 50%", models["eager"]), torch.no_grad():
        models["eager"](**video_inputs(spec, 1, groups=3, side=12, seed=6))
        assert vc.kept_counts(models["eager"])["llm"]["llm.layer2#0"] == (108, 54)


def test_image_and_video_in_one_call_are_refused(family):
    spec, models = family
    image = mrope_inputs(1)
    video = video_inputs(spec, 1)
    ids = torch.cat([image["input_ids"], video["input_ids"]], dim=1)
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image["pixel_values"],
                image_grid_thw=image["image_grid_thw"], pixel_values_videos=video["pixel_values_videos"],
                video_grid_thw=video["video_grid_thw"],
                mm_token_type_ids=torch.cat([image["mm_token_type_ids"], video["mm_token_type_ids"]], dim=1))
    with vc.apply("at llm.layer2 keep text top 50%", models["eager"]), torch.no_grad():
        with pytest.raises(vc.CompileError, match="one kind of visual input per call"):
            models["eager"](**call)


def test_a_policy_that_does_not_fit_the_video_is_refused_at_run_time(family):
    """`top 20` fits the reference image's 64 tokens, not a one-group 6x6 clip's 9."""
    spec, models = family
    with vc.apply("at llm.layer2 keep text top 20", models["eager"]), torch.no_grad():
        with pytest.raises(vc.CompileError, match="video of 1 temporal group of 6x6 patches .* only 9 remain"):
            models["eager"](**video_inputs(spec, 1, groups=1, side=6, seed=6))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_selection_on_a_video_equals_the_step_by_step_reference(family, attn):
    """`during decode at llm.layer2 attend top 16` picks among the video's rows (found by
    `video_token_id`): generate's scores equal the masked reference step by step."""
    spec, models = family
    model = models[attn]
    assert_decode_selection_matches(model, plain_copy(spec, model), video_inputs(spec, 2),
                                    spec.config().video_token_id, keep=16)
