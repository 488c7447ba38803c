"""Segments of a clip (issue 20 item 2): `per window N`, `per segment C [below T]`
(FastVID's dynamic segmentation), the frame-level `uniqueness` score and `merge static`
(DyCoke's temporal token merging inside windows or segments), on video inputs of
tiny-qwen2-vl; located errors (round trips, image refusals, an image call and compiled
FLOPs = cost model sit with `per frame`'s in tests/test_video_frames.py). The references
are plain loops over the uncompiled model's video features."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import vtdsl.compiler as vc
from vtdsl.cli import main
from vtdsl.ir import check
from vtdsl.lang import PolicyError, parse

from plain_refs import first_error, plain_copy, sharpened_pair, top_rows
from test_video_frames import CELLS, GROUPS, SPEC, VID, clip, temporal_by_hand, video_features


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


@pytest.fixture(scope="module")
def features(models):
    """The plain model's merged video features (the LLM's input rows) for `clip()`."""
    return video_features(plain_copy(SPEC, models["eager"]), clip())


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def frame_sims(feats: torch.Tensor) -> list[float]:
    """Cosine of consecutive frames' mean tokens: FastVID's similarity, on the means."""
    means = [feats[g * CELLS:(g + 1) * CELLS].double().mean(0) for g in range(GROUPS)]
    return [cos(means[g], means[g + 1]) for g in range(GROUPS - 1)]


def segments_by_hand(sims: list[float], count: int, below: float | None = None) -> list[int]:
    """Each frame's segment: cut after the count-1 lowest similarities and every one below."""
    lowest = sorted(range(len(sims)), key=lambda t: sims[t])[:count - 1]
    cuts = {t for t in range(len(sims)) if t in lowest or (below is not None and sims[t] < below)}
    seg, out = 0, [0]
    for t in range(len(sims)):
        seg += t in cuts
        out.append(seg)
    return out


def rows_of(batch_inputs, b: int) -> torch.Tensor:
    return (batch_inputs["input_ids"][b] == VID).nonzero().flatten()


# ---------------------------------------------------------------------------- language
@pytest.mark.parametrize("src, at, words", [
    ("at llm.layer0 merge statik 70% per window 4", "statik", "did you mean 'static'"),
    ("at llm.layer0 merge static 70% per frame", "per frame", "window or segment, not per frame"),
    ("at llm.layer0 keep text top 5 per segment 3 belo 0.9", "belo", "did you mean 'below'"),
    ("at llm.layer0 keep text top 5 per window 0", "0", "between 1 and 4096"),
    ("at llm.layer0 keep text top 5 per segment 2 below 1.5", "1.5", "between 0 and 1"),
    # VidCom2's `per frame softmax T` (tests/test_frame_softmax.py)
    ("at llm.layer0 keep norm top 25% per frame softmax 0", "0", "temperature above 0"),
    ("at llm.layer0 keep norm top 25% per frame softmax 1001", "1001", "temperature above 0"),
    ("at llm.layer0 keep norm top 25% per frame proportional softmax 0.1", "softmax", "unexpected 'softmax'"),
    ("at llm.layer0 keep norm top 25% per window 4 softmax 0.1", "softmax", "unexpected 'softmax'"),
])
def test_syntax_errors_are_located(src, at, words):
    with pytest.raises(PolicyError) as err:
        parse(src)
    d = err.value.diagnostics[0]
    assert d.span.column == src.rindex(at) + 1
    assert words in d.message + (d.hint or "")


# ---------------------------------------------------------------------------- check time
VIDEO = SPEC.for_video(8, 224, 224)  # 4 temporal groups of 12x12 = 144 tokens


@pytest.mark.parametrize("src, at, words", [
    ("at llm.layer0 merge static 70% per segment 2 below 0.9", "per segment", "would vary the tokens kept"),
    ("at llm.layer1 keep text top 50%; at llm.layer2 merge static 70% per window 4", "merge static",
     "an earlier stage removed some"),
    ("at llm.layer2 keep text top 30% per segment 5", "per segment", "into empty segments"),
    ("at llm.layer0 merge static 145 per window 2", "145", "a frame has 144"),
    ("at vit.layer1 merge static 70% per window 4", "per window", "sees no frames"),
])
def test_check_time_errors_are_located(src, at, words):
    spec = VIDEO if not src.startswith("at vit") else SPEC
    d = first_error(src, spec)
    assert d.span.column == src.index(at) + 1 and words in d.message, d.message


def test_a_video_plan_counts_the_windows_first_frames_whole():
    # 4 groups of 144: one window of 4 keeps frame 0 and 144 - 101 of the three others
    stage = check("at llm.layer0 merge static 70% per window 4", VIDEO).stages[0]
    assert (stage.action, stage.region, stage.merge_rest, stage.tokens_out) == ("static", ("window", 4, 0), 101, 273)
    assert check("at llm.layer0 merge static 70% per window 3", VIDEO).stages[0].tokens_out == 576 - 2 * 101
    assert check("at llm.layer0 merge static 10 per segment 3", VIDEO).stages[0].tokens_out == 576 - 10


def test_check_cli_refuses_a_window_on_an_image_and_counts_a_video(tmp_path):
    policy = tmp_path / "p.vt"
    policy.write_text("model \"tiny-qwen2-vl\"\nat llm.layer0 merge static 70% per window 4\n")
    run = CliRunner().invoke(main, ["check", str(policy), "--image", "224x224"])
    assert run.exit_code == 2 and "p.vt:2:32" in run.output and "has no frames" in run.output
    run = CliRunner().invoke(main, ["check", str(policy), "--video", "8x224x224"])
    assert run.exit_code == 0 and "576 -> 273" in run.output


# ---------------------------------------------------------------------------- run time
def test_per_window_keeps_each_windows_share_by_a_plain_loop(models, features):
    """`temporal top 50% per window 2`: each pair of groups keeps its 16 best-changed rows."""
    model, batch_inputs = models["eager"], clip()
    scores = temporal_by_hand(features)
    want = []
    for b in range(2):
        rows, full = rows_of(batch_inputs, b), torch.zeros(batch_inputs["input_ids"].shape[1])
        full[rows] = scores[b]
        window = 2 * CELLS
        # the first group scores 2 everywhere: its window takes its 16 first rows by index
        first = rows[:window // 2]
        want.append(torch.cat([first, top_rows(full, rows[window:], window // 2)]))
    with vc.apply("at llm.layer0 keep temporal top 50% per window 2", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer0#0"], torch.stack(want))


@pytest.mark.parametrize("use_below", [False, True])
def test_per_segment_shares_the_budget_over_fastvids_segments(models, features, use_below):
    """Segments by hand from the frames' mean features (FastVID's DySeg), then an even split
    of 32 tokens over them, each segment's rows ranked by `norm`."""
    model, batch_inputs = models["eager"], clip()
    k = GROUPS * CELLS // 2
    for_policy, want = [], []
    for b in range(2):
        sims = sorted(frame_sims(features[b]))
        for_policy.append((sims[1] + sims[2]) / 2)  # between the 2nd and 3rd lowest: one more cut
    below = round(min(for_policy), 6) if use_below else None
    counts = []
    for b in range(2):
        seg = segments_by_hand(frame_sims(features[b]), 2, below)
        count = seg[-1] + 1
        counts.append(count)
        rows = rows_of(batch_inputs, b)
        norms = torch.zeros(batch_inputs["input_ids"].shape[1])
        norms[rows] = features[b].double().norm(dim=-1).float()
        parts = []
        for s in range(count):
            share = k // count + (1 if s < k % count else 0)
            mine = torch.cat([rows[g * CELLS:(g + 1) * CELLS] for g in range(GROUPS) if seg[g] == s])
            assert share <= len(mine)
            parts.append(mine if share == len(mine) else top_rows(norms, mine, share))
        want.append(torch.cat(parts).sort().values)
    assert max(counts) == (3 if use_below else 2)  # `below` cut once more
    src = "at llm.layer0 keep norm top 50% per segment 2" + (f" below {below:.6f}" if use_below else "")
    with vc.apply(src, model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer0#0"], torch.stack(want))


def static_by_hand(feats: torch.Tensor, seg: list[int], merged: int) -> list[int]:
    """DyCoke's rule in a segment: offset o compares with offset o & (o - 1), whose token
    at the same position stands for the `merged` most similar ones."""
    kept = []
    for g in range(GROUPS):
        start = seg.index(seg[g])
        offset = g - start
        cells = list(range(g * CELLS, (g + 1) * CELLS))
        if offset == 0:
            kept += cells
            continue
        ref = start + (offset & (offset - 1))
        sims = [cos(feats[r], feats[ref * CELLS + r - g * CELLS]) for r in cells]
        order = sorted(range(CELLS), key=lambda i: -sims[i])
        assert sims[order[merged - 1]] - sims[order[merged]] > 1e-6, "near-tied similarities"
        kept += [cells[i] for i in sorted(order[merged:])]
    return kept


@pytest.mark.parametrize("region", ["window 4", "window 2", "segment 2"])
def test_merge_static_keeps_what_a_plain_loop_keeps(models, features, region):
    model, batch_inputs = models["eager"], clip()
    merged = 11  # 70% of 16
    want = []
    for b in range(2):
        if region.startswith("window"):
            size = int(region.split()[1])
            seg = [g // size for g in range(GROUPS)]
        else:
            seg = segments_by_hand(frame_sims(features[b]), 2)
        rows = rows_of(batch_inputs, b)
        want.append(rows[static_by_hand(features[b], seg, merged)])
    with vc.apply(f"at llm.layer0 merge static 70% per {region}", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer0#0"], torch.stack(want))


def test_uniqueness_scores_each_frame_by_its_distance_to_the_clips_centre(models, features):
    """`uniqueness + temporal`: the frame's 1 - cos(mean, mean of means) added to each row's
    change; a plain loop ranks the same rows."""
    model, batch_inputs = models["eager"], clip()
    change = temporal_by_hand(features)
    want = []
    for b in range(2):
        means = [features[b, g * CELLS:(g + 1) * CELLS].double().mean(0) for g in range(GROUPS)]
        centre = torch.stack(means).mean(0)
        unique = [1 - cos(m, centre) for m in means]
        assert len({round(u, 6) for u in unique}) == GROUPS  # frames differ
        rows = rows_of(batch_inputs, b)
        full = torch.zeros(batch_inputs["input_ids"].shape[1])
        full[rows] = change[b] + torch.tensor([unique[g] for g in range(GROUPS) for _ in range(CELLS)]).float()
        # the first group's rows all score 2 + its uniqueness: the 16 tie, taken by index
        want.append(torch.cat([rows[:CELLS], top_rows(full, rows[CELLS:], CELLS)]))
    with vc.apply("at llm.layer0 keep sum(uniqueness, temporal) top 50%", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["llm.layer0#0"], torch.stack(want))
