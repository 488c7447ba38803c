"""Frames as an axis of the language (issue 20 item 2): `per frame [proportional]` budgets
and the `temporal` score (1 - cosine with the same position one frame earlier), on video
inputs of tiny-qwen2-vl; located errors where a policy names frames on an image. The
references are plain loops over the uncompiled model's video features and attention."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import vtdsl.compiler as vc
from vtdsl.cli import main
from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import first_error, last_query_attention, mrope_inputs, plain_copy, sharpened_pair, top_rows

from family_runs import compiled_prefill_flops
from test_qwen_video import video_inputs

SPEC = get_spec("tiny-qwen2-vl")
VID = SPEC.config().video_token_id
GROUPS, SIDE = 4, 8  # four temporal groups of 8x8 patches: 4 x 16 merged tokens
CELLS = (SIDE // 2) ** 2


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def clip(batch: int = 2, seed: int = 7) -> dict:
    return video_inputs(SPEC, batch, groups=GROUPS, side=SIDE, seed=seed)


def video_features(model, batch_inputs) -> torch.Tensor:
    """The plain model's merged video features ``[B, T·cells, d]`` (what the LLM receives)."""
    with torch.no_grad():
        out = model.model.get_video_features(batch_inputs["pixel_values_videos"], batch_inputs["video_grid_thw"])
    return torch.stack(list(out.pooler_output))


def temporal_by_hand(features: torch.Tensor) -> torch.Tensor:
    """1 - cos with the same cell one group earlier, 2 on the first group: a plain loop."""
    b, n, _ = features.shape
    scores = torch.full((b, n), 2.0)
    for s in range(b):
        for i in range(CELLS, n):
            a, p = features[s, i].double(), features[s, i - CELLS].double()
            scores[s, i] = float(1 - a @ p / (a.norm() * p.norm()))
    return scores


# ---------------------------------------------------------------------------- language
@pytest.mark.parametrize("src", [
    "at llm.layer0 keep temporal top 25%",
    "at llm.layer2 keep text top 30% per frame",
    "at llm.layer2 keep text top 30% per frame proportional",
    "at llm.layer0 keep temporal top 10 + uniform 8 per frame",
    "at llm.layer0 merge static 70% per window 4",  # segments: tests/test_video_segments.py
    "at llm.layer0 merge static 8 per segment 3",
    "at llm.layer2 keep text top 30% per window 2",
    "at llm.layer2 keep text top 30% per segment 4 proportional",
    "at llm.layer2 keep text top 30% per segment 4 below 0.85",
    "at llm.layer0 keep sum(uniqueness, temporal) top 25% per frame proportional",
])
def test_parse_format_yaml_round_trip(src):
    text = format_policy(parse(src))
    assert text.strip() == src
    assert format_policy(from_yaml(to_yaml(parse(src)))) == text


def test_per_frame_takes_no_grid():
    d = first_error("at llm.layer2 keep text top 30% per frame 2x2", SPEC)
    assert d.span.column == len("at llm.layer2 keep text top 30% per frame ") + 1


# ---------------------------------------------------------------------------- check time
@pytest.mark.parametrize("src, at", [
    ("at llm.layer2 keep text top 30% per frame", "per frame"),
    ("at llm.layer0 keep temporal top 25%", "temporal"),
    ("at llm.layer2 keep text top 30% per window 2", "per window"),  # tests/test_video_segments.py
    ("at llm.layer2 keep text top 30% per segment 2", "per segment"),
    ("at llm.layer0 merge static 70% per window 4", "per window"),
    ("at llm.layer0 keep uniqueness top 25%", "uniqueness"),
])
@pytest.mark.parametrize("spec, words", [
    (SPEC.for_image(224, 224), "sized for an image here, which has no frames"),
    (get_spec("tiny-llava"), "takes no video input"),
])
def test_frames_named_on_an_image_are_refused_where_named(src, at, spec, words):
    d = first_error(src, spec)
    assert (d.span.line, d.span.column) == (1, src.index(at) + 1)
    assert words in d.message


def test_a_video_plan_splits_the_budget_over_its_temporal_groups():
    video = SPEC.for_video(8, 224, 224)  # the video range resizes each frame to 336x336: 4 x 144 tokens
    stage = check("at llm.layer2 keep text top 25% per frame", video).stages[0]
    assert (stage.region, stage.tokens_in, stage.tokens_out) == (("frame", 4, 0), 576, 144)
    # the model's own (unsized) spec plans for its videos: one frame until a call sizes it
    assert check("at llm.layer2 keep text top 25% per frame", SPEC).stages[0].region == ("frame", 1, 0)


def test_check_cli_locates_frames_on_an_image(tmp_path):
    policy = tmp_path / "p.vt"
    policy.write_text("model \"tiny-qwen2-vl\"\nat llm.layer0 keep temporal top 25%\n")
    run = CliRunner().invoke(main, ["check", str(policy), "--image", "224x224"])
    assert run.exit_code == 2 and "p.vt:2:20" in run.output and "has no frames" in run.output
    assert CliRunner().invoke(main, ["check", str(policy), "--video", "8x224x224"]).exit_code == 0


# ---------------------------------------------------------------------------- run time
def test_temporal_top_keeps_what_a_plain_loop_ranks_first(models):
    model, batch_inputs = models["eager"], clip()
    scores = temporal_by_hand(video_features(plain_copy(SPEC, model), batch_inputs))
    k = GROUPS * CELLS // 2  # the first frame (scored 2) and the 16 most changed of the later ones
    want = []
    for b in range(2):
        rows = (batch_inputs["input_ids"][b] == VID).nonzero().flatten()
        full = torch.zeros(batch_inputs["input_ids"].shape[1])
        full[rows] = scores[b]
        want.append(top_rows(full, rows, k))
    with vc.apply("at llm.layer0 keep temporal top 50%", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer0#0"], torch.stack(want))


def test_temporal_after_a_stage_scores_unseen_where_the_predecessor_was_removed(models):
    """After `uniform` kept every other token, a token whose predecessor went scores 2:
    the kernel pairs rows by (frame, position), not by their order."""
    from vtdsl.ops.scorers.temporal import temporal_change

    h = torch.randn(1, 6, 4)
    frame = torch.tensor([[-1, 0, 0, 1, 1, -1]])  # text, two frames of cells 0 and 1, text
    pos = torch.tensor([[-1, 0, 1, 1, 0, -1]])  # the second frame's rows hold cells 1 then 0
    got = temporal_change(h, frame, pos)
    cos = torch.nn.functional.cosine_similarity
    assert got[0, 0] == 0 and got[0, 5] == 0 and got[0, 1] == 2 and got[0, 2] == 2
    assert torch.allclose(got[0, 3], 1 - cos(h[0, 3], h[0, 2], dim=0))
    assert torch.allclose(got[0, 4], 1 - cos(h[0, 4], h[0, 1], dim=0))
    dropped = temporal_change(h[:, [0, 2, 3, 4, 5]], frame[:, [0, 2, 3, 4, 5]], pos[:, [0, 2, 3, 4, 5]])
    assert dropped[0, 3] == 2  # cell 0 of frame 1 lost its predecessor


def test_per_frame_keeps_each_groups_share_by_a_plain_loop(models):
    model, batch_inputs = models["eager"], clip()
    att = last_query_attention(plain_copy(SPEC, model), batch_inputs, 1)
    want = []
    for b in range(2):
        rows = (batch_inputs["input_ids"][b] == VID).nonzero().flatten()
        want.append(torch.cat([top_rows(att[b], rows[g * CELLS:(g + 1) * CELLS], CELLS // 4) for g in range(GROUPS)]))
    with vc.apply("at llm.layer2 keep text top 25% per frame", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"], torch.stack(want))


@pytest.mark.parametrize("src, column", [("at llm.layer2 keep text top 25% per frame", 33),
                                         ("at llm.layer0 merge static 70% per window 4", 32)])
def test_an_image_call_under_a_frame_policy_is_refused_with_its_location(models, src, column):
    with vc.apply(src, models["eager"]), torch.no_grad():
        with pytest.raises(vc.CompileError, match=rf"has no frames \(policy line 1, column {column}\)"):
            models["eager"](**mrope_inputs(1))


@pytest.mark.parametrize("src", ["at llm.layer0 keep temporal top 25%",
                                 "at llm.layer0 keep temporal top 50% per frame; at llm.layer2 keep text top 5",
                                 "at llm.layer0 merge static 70% per window 2; at llm.layer2 keep text top 8",
                                 "at llm.layer0 keep temporal top 50% per segment 2 below 0.5"])
def test_compiled_flops_equal_the_cost_model(models, src):
    batch_inputs = clip(1)
    flops = compiled_prefill_flops(models["eager"], src, batch_inputs)
    video = family_of(SPEC).video_spec(SPEC, batch_inputs)
    assert flops == estimate(check(src, video), text_tokens=8, logits="all").flops


def test_per_frame_proportional_shares_by_each_groups_mean_score(models):
    """`top 25% per frame proportional`: group g gets floor(16·m_g/Σm) of the 16 tokens
    (m_g its mean score), the tokens the floors leave over one each to the groups of
    highest mean, then its own top tokens: a plain loop over the plain model's attention."""
    model, batch_inputs = models["eager"], clip()
    att = last_query_attention(plain_copy(SPEC, model), batch_inputs, 1)
    k = GROUPS * CELLS // 4
    want = []
    for b in range(2):
        rows = (batch_inputs["input_ids"][b] == VID).nonzero().flatten()
        groups = [rows[g * CELLS:(g + 1) * CELLS] for g in range(GROUPS)]
        means = [float(att[b, g].clamp(min=0).mean()) for g in groups]
        shares = [int(k * m / sum(means)) for m in means]
        for g in sorted(range(GROUPS), key=lambda g: (-means[g], g))[:k - sum(shares)]:
            shares[g] += 1
        assert shares != [k // GROUPS] * GROUPS  # not the even split: the shares follow the means
        want.append(torch.cat([top_rows(att[b], g, s) if s else g[:0] for g, s in zip(groups, shares)]).sort().values)
    with vc.apply("at llm.layer2 keep text top 25% per frame proportional", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"], torch.stack(want))
