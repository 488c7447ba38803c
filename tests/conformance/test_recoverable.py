"""Recoverable Compression against its authors' rule: the kept patches are equal.

Reference: banjiuyufen/Recoverable-Compression @ d927594467a0eff8bdf35e9c933f1423a4b1b760,
llava/model/multimodal_encoder/clip_encoder.py:
- find_max_derivative_position (lines 36-46): the share of sklearn's
  LocalOutlierFactor(n_neighbors=k, contamination="auto") outliers of a 1-D score;
- CLIPTextEncoder.forward (lines 82-100): the question padded to max_length, the text
  model run without a mask, its last position through text_projection;
- get_score_by_text (lines 166-188): the tower's last hidden state through
  visual_projection, cosine with the text feature, times width ** -0.5;
- token_recycling_with_text_in_vision_and_clustring (lines 309-359): layer 23's q/k as one
  full-width head (scale C ** -0.5), the CLS row; the visual top by the LOF(20) share
  (int(N * share)); the text score with the visual top set to its minimum, the text top
  by its LOF(20) share of the N - visual tokens left; the cluster centres: the rest's CLS
  attention, its LOF(10) share times the count kept so far (N is reassigned there).
The kept patches are the union of the three. The merge that follows (lines 361-432)
changes the centres' values, not which patches are kept, and is not asserted here.
Tiny random CLIP (tests/tiny_clip.py): a 2-layer text tower and a visual projection of
tiny-llava's ViT width. Before `cls(whole)` the zoo read the head mean (`cls`): Jaccard
0.56 / 0.87 / 0.93 against this rule on the three seeds.
"""

from __future__ import annotations

import pytest
import torch

from tiny_clip import MAX_LENGTH, tiny_clip

from . import plain
from .conftest import IMPLS, POLICIES

POLICY = POLICIES / "recoverable.vt"

CLAIMS = {"recoverable": 1.0}
QUESTIONS = ("What is written on the sign?", "How many cars are there in the picture?",
             "Is the person on the left holding an umbrella?")


def _lof_share(score: torch.Tensor, k: int) -> float:
    """find_max_derivative_position: sklearn when importable, else its definition."""
    values = [float(v) for v in score.to(torch.float32).flatten()]
    try:
        from sklearn.neighbors import LocalOutlierFactor
    except ImportError:
        return plain.lof_outliers(values, k) / len(values)
    pred = LocalOutlierFactor(n_neighbors=k, contamination="auto").fit_predict([[v] for v in values])
    return int((pred == -1).sum()) / len(values)


def rc_keep(cls_attn: torch.Tensor, similarity: torch.Tensor, k_rest: int = 10) -> tuple[list[int], list[int]]:
    """The patches RC keeps (``[1, N]`` scores): (vision + text tops, cluster centres)."""
    n = cls_attn.shape[-1]
    index_by_vision = torch.topk(cls_attn, int(n * _lof_share(cls_attn, 20)), dim=1).indices
    similarity = similarity.clone()
    similarity[:, index_by_vision[0, :]] = similarity.min(dim=-1).values
    count = int((n - index_by_vision.shape[-1]) * _lof_share(similarity, 20))
    index_by_text = torch.topk(similarity, count, dim=1).indices
    kept = sorted(torch.cat((index_by_vision, index_by_text), dim=-1)[0].tolist())
    others = [i for i in range(n) if i not in set(kept)]
    rest_attn = cls_attn[:, others]
    centres = torch.topk(rest_attn, int(len(kept) * _lof_share(rest_attn, k_rest)), dim=1).indices[0]
    return kept, sorted(others[i] for i in centres.tolist())


def full_width_cls(model, out) -> torch.Tensor:
    """RC's visual score: layer 23's q/k as one head of the whole width, the CLS row."""
    layer = model.model.vision_tower.encoder.layers[23]
    with torch.no_grad():
        x = layer.layer_norm1(out.hidden_states[23])
        q, k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
    return torch.softmax((q @ k.transpose(-2, -1)) * x.shape[-1] ** -0.5, dim=-1)[:, 0, 1:]


def text_score(clip, out, question: str) -> torch.Tensor:
    """get_score_by_text on the tower's last hidden state (layer 23's output)."""
    model, tokenizer = clip
    ids = tokenizer(question, max_length=MAX_LENGTH, truncation=True, padding="max_length",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text = model.text_projection(model.text_model(ids).last_hidden_state[:, -1, :])
        image = model.visual_projection(out.hidden_states[24])[:, 1:, :]
    text = torch.nn.functional.normalize(text, p=2, dim=-1)
    return (text[:, None, :] @ torch.nn.functional.normalize(image, p=2, dim=-1).transpose(-2, -1))[:, 0, :] \
        * image.shape[-1] ** -0.5


@pytest.fixture(scope="module")
def clip_dir():
    path, model, tokenizer = tiny_clip()
    return path, (model, tokenizer)


def _run(case, attn, vit_out, compiled, clip_dir, ref):
    path, clip = clip_dir
    question = QUESTIONS[case.seed % len(QUESTIONS)]
    out = vit_out(case)
    kept, _, _ = compiled("recoverable", attn, case, clip=path, question=question)
    got = sorted(v - 1 for v in kept["vit.out#0"][:-1])  # the last token is `absorb`'s, made of the rest
    return got, rc_keep(full_width_cls(ref, out), text_score(clip, out, question))


@pytest.mark.parametrize("attn", IMPLS)
def test_rc_keeps_the_patches_the_authors_rule_keeps(attn, ref, cases, vit_out, compiled, clip_dir):
    for case in cases:
        got, own = _run(case, attn, vit_out, compiled, clip_dir, ref)
        assert own[0], f"seed {case.seed}: the check needs a recovered patch"
        assert plain.jaccard(got, own[0] + own[1]) >= CLAIMS["recoverable"], f"seed {case.seed}"


def test_the_text_round_recovers_other_patches_than_the_visual_one(ref, cases, vit_out, clip_dir):
    """Guards the check above: on each seed the text score picks patches of its own, so
    an implementation that ignored `clip_text` would fail it."""
    for case in cases:
        out = vit_out(case)
        cls_attn = full_width_cls(ref, out)
        with_text = rc_keep(cls_attn, text_score(clip_dir[1], out, QUESTIONS[case.seed % len(QUESTIONS)]))
        without = rc_keep(cls_attn, cls_attn)
        assert set(with_text[0]) != set(without[0]), f"seed {case.seed}"


def test_the_cluster_round_rule(ref, cases, vit_out, compiled, clip_dir):
    """RC's LOF(10) share of the rest, times the 13-25 patches kept, is below one centre on
    every seed here (as RC allows: no centre, no extra token); LOF(2) finds more outliers,
    so the same policy with `lof(2, rest)` checks the centres' count and choice."""
    path, clip = clip_dir
    source = POLICY.read_text().replace("lof(10, rest)", "lof(2, rest)")
    assert source.count("lof(2, rest)") == 1
    for case in cases:
        question = QUESTIONS[case.seed % len(QUESTIONS)]
        out = vit_out(case)
        kept, _, _ = compiled(source, "eager", case, clip=path, question=question)
        tops, centres = rc_keep(full_width_cls(ref, out), text_score(clip, out, question), k_rest=2)
        assert centres, f"seed {case.seed}"
        assert sorted(v - 1 for v in kept["vit.out#0"][:-1]) == sorted(tops + centres), f"seed {case.seed}"
