"""VidCom2's pieces in the language: `per frame softmax T` (frame budgets from a softmax of
the first term's frame means; its syntax errors: tests/test_video_segments.py) and the `gauss_video` / `gauss_frame` scores (minus a
multi-scale Gaussian similarity to the clip's and the frame's mean token). The hard numbers
below are worked out by hand from VidCom2's formulas; the scores are checked against a
per-token loop in double precision. The whole method against its code:
tests/conformance/test_vidcom2.py."""

from __future__ import annotations

import math

import pytest
import torch

from vtdsl.ir import check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.lang.errors import PolicyError
from vtdsl.models import get_spec
from vtdsl.ops.scorers.gauss import gaussian_distance
from vtdsl.ops.select import softmax_shares

from plain_refs import first_error

SPEC = get_spec("tiny-qwen2.5-vl")
POLICY = "at llm.layer0 keep gauss_video top 0 + sum(gauss_video, gauss_frame) top 25% per frame softmax 0.01"


# ---------------------------------------------------------------------------- language
@pytest.mark.parametrize("src", [POLICY, "at llm.layer2 keep text top 30% per frame softmax 2.5"])
def test_parse_format_yaml_round_trip(src):
    text = format_policy(parse(src))
    assert text.strip() == src
    assert format_policy(from_yaml(to_yaml(parse(src)))) == text


def test_a_missing_temperature_is_located_at_the_end():
    src = "at llm.layer0 keep norm top 25% per frame softmax"
    with pytest.raises(PolicyError) as err:
        parse(src)
    assert err.value.diagnostics[0].span.column == len(src) + 1 and "a number" in str(err.value)


def test_softmax_needs_a_scored_first_term():
    src = "at llm.layer0 keep uniform 8 + norm top 10 per frame softmax 0.1"
    d = first_error(src, SPEC.for_video(4, 112, 112))
    assert d.span.column == src.index("uniform") + 1 and "'softmax' shares the budget" in d.message


@pytest.mark.parametrize("name", ["gauss_video", "gauss_frame"])
def test_gauss_scores_are_refused_on_an_image_where_named(name):
    src = f"at llm.layer0 keep {name} top 25%"
    d = first_error(src, SPEC.for_image(224, 224))
    assert d.span.column == src.index(name) + 1 and "has no frames" in d.message


def test_the_plan_keeps_a_quarter_and_records_the_temperature():
    stage = check(POLICY, SPEC.for_video(8, 224, 224)).stages[0]
    assert stage.region[0] == "frame" and stage.region_softmax == 0.01
    assert stage.tokens_out == int(stage.tokens_in * 0.25 + 0.5)


# ---------------------------------------------------------------------------- the shares
def shares(means: list[float], sizes: list[int], k: int, temperature: float) -> list[int]:
    """softmax_shares on tokens whose scores equal their region's mean."""
    scores = torch.tensor([m for m, s in zip(means, sizes) for _ in range(s)])[None]
    ids = torch.tensor([g for g, s in enumerate(sizes) for _ in range(s)])[None]
    return softmax_shares(scores, ids, len(sizes), k, temperature)[0].tolist()


def test_shares_follow_vidcom2s_scales():
    """T = 1, means 0, ln 2, ln 5: p = 1/8, 2/8, 5/8, mean 1/3; 3 frames of 12, k = 12:
    b = 1/3, b (1 + p - 1/3) · 12 = 3.17, 3.67, 5.17, rounded 3, 4, 5 (sum 12)."""
    assert shares([0.0, math.log(2), math.log(5)], [12, 12, 12], 12, 1.0) == [3, 4, 5]


def test_a_total_off_k_is_brought_back_from_the_frames_rounded_up_most():
    """8 frames of 16, k = 32, one frame far above the rest at T = 0.01: p = 1, 0, ..., mean
    1/8; scales 0.25 · 1.875 and 0.25 · 0.875 give 7.5 and 3.5, rounded half to even 8 and
    4 (36). Every frame was rounded up by 0.5: the first four (lowest index) give one back
    (frame 0 first, then it has been rounded down and frames 1-3 follow)."""
    assert shares([10.0] + [0.0] * 7, [16] * 8, 32, 0.01) == [7, 3, 3, 3, 4, 4, 4, 4]


def test_an_empty_frame_gets_nothing_and_no_weight():
    """Frame 1 lost all its tokens: frames 0 and 2 (means 0 and ln 3 at T = 1: p = 1/4, 3/4,
    mean 1/2) share k = 8 of 16 tokens: 0.5 · 0.75 · 8 = 3 and 0.5 · 1.25 · 8 = 5."""
    assert shares([0.0, 7.0, math.log(3)], [8, 0, 8], 8, 1.0) == [3, 0, 5]


# ---------------------------------------------------------------------------- the scores
def gauss_by_hand(h: torch.Tensor, frame: torch.Tensor, centre: str) -> torch.Tensor:
    """Minus VidCom2's kernel sum, token by token in double precision (text rows: 0)."""
    out = torch.zeros(h.shape[:2], dtype=torch.float64)
    for b in range(h.shape[0]):
        rows = [i for i in range(h.shape[1]) if frame[b, i] >= 0]
        x = h[b, rows].double()
        var = [float(((x[:, c] - x[:, c].mean()) ** 2).mean()) for c in range(x.shape[1])]
        channels = sorted(range(len(var)), key=lambda c: var[c])[: x.shape[1] // 2]
        x = x[:, channels]
        x = x / x.norm(dim=1, keepdim=True)
        for j, i in enumerate(rows):
            same = [r for r in range(len(rows)) if centre == "video" or frame[b, rows[r]] == frame[b, i]]
            c = x[same].mean(dim=0)
            d2 = float(((x[j] - c) ** 2).sum())
            out[b, i] = -sum(math.exp(-d2 / (2 * a)) for a in (0.125, 0.25, 0.5, 1.0, 2.0))
    return out


@pytest.mark.parametrize("centre", ["video", "frame"])
def test_gauss_scores_match_a_per_token_loop(centre):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 30, 12, generator=g) * torch.linspace(0.2, 3.0, 12)
    frame = torch.tensor([[-1, -1] + [f for f in range(4) for _ in range(6)] + [-1, -1, -1, -1],
                          [-1] + [f for f in range(3) for _ in range(9)] + [-1, -1]])
    got = gaussian_distance(h, frame, centre)
    assert torch.allclose(got.double(), gauss_by_hand(h, frame, centre), atol=1e-5)
    assert bool((got[frame < 0] == 0).all())


def test_the_compile_listing_names_the_temperature():
    import vtdsl.compiler as vc

    stage = check(POLICY, SPEC.for_video(8, 224, 224)).stages[0]
    assert vc.stage_text(stage).endswith(" per frame (4 frames) softmax 0.01")
