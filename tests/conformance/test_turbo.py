"""Turbo against its authors' rule (documented approximations: merge vs drop, token order).

Reference: anakin-skywalker-Joseph/Turbo @ 1e7e1081392bce6bec8755e64d6b3a14d722f693 (the
authors' release; the MiniGPT-v2 port at bd8f8e52 has the same merge.py):
Code-BLIP/turbo/merge.py bipartite_unimodal_matching (lines 69-105: keys normalised, set A
= even places, B = odd; score = cosine(A, B) - beta^|gamma - layer| x alpha x 30 x the
CLS attention of the A token; the class token never merges; the r A tokens with the best
score merge into their best B token; output = unmerged A in order, then B) and
merge_wavg_ours (lines 60-66: size-weighted average); Code-BLIP/turbo/patch/turbo.py
TurboAttention (lines 63-78: proportional attention, the CLS row's head mean),
TurboBlock (lines 81-105: merge between attention and MLP, metric = the keys' head mean)
and apply_patch (lines 123-141: beta 1, gamma 0, r_threshold 40); alpha 5 (README,
eval_vqa.py --alphaval). The r schedule is turbo*.vt's (tome*.vt's): one r per block
0..22, 192/128/64 tokens at the features.

The zoo drops the A tokens Turbo merges (their values are not averaged into B), reads
plain attention (no sizes) and keeps raster order, so after the first block the A/B
split differs; survivors are compared by Jaccard against the floors the headers state.
The first block is exact: there the zoo drops exactly Turbo's sources."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS
from .test_tome import bipartite_soft_matching, merge_keep

SCHEDULES = {"turbo": [17] * 16 + [16] * 7, "turbo-128": [20] * 11 + [19] * 12, "turbo-64": [23] * 6 + [22] * 17}
CLAIMS = {"turbo": 0.19, "turbo-128": 0.09, "turbo-64": 0.04}  # measured; stated in policies/turbo*.vt
ALPHA = 5


def turbo_keep(model, h: torch.Tensor, schedule: list[int], alpha: float = ALPHA) -> tuple[list[int], list[int]]:
    """(survivors, first block's merged vids): ToMe's block (test_tome.merge_keep) with
    Turbo's semantic term, alpha x 30 x the CLS attention of the A token."""
    return merge_keep(model, h, schedule, value_weight=alpha * 30)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_turbo_keeps_nearly_what_turbo_keeps(name, attn, ref, cases, vit_out, compiled, once):
    scores = []
    for case in cases:
        with torch.no_grad():
            want, first = once((name, case.seed),
                               lambda: turbo_keep(ref, vit_out(case).hidden_states[0], SCHEDULES[name]))
        kept, _, _ = compiled(name, attn, case)
        assert sorted(set(range(1, 577)) - set(kept["vit.layer1#0"])) == first, f"seed {case.seed}"
        got = sorted(kept["vit.layer23#22"])
        assert len(got) == len(want) == 576 - sum(SCHEDULES[name])
        scores.append(plain.jaccard(got, want))
    assert min(scores) >= CLAIMS[name], scores


def test_the_semantic_value_changes_what_the_first_block_merges(ref, cases, vit_out):
    """Without the CLS term (alpha 0) Turbo is ToMe: on every seed the first block would
    merge other tokens, so the equality above checks the informativity term too."""
    layer = ref.model.vision_tower.encoder.layers[0]
    for case in cases:
        h = vit_out(case).hidden_states[0]
        with torch.no_grad():
            probs, _, k, _ = plain.clip_attention(layer, h)
        value = ALPHA * 30 * probs[:, :, 0, :].mean(1)
        sources = [sorted(bipartite_soft_matching(k.mean(1), 17, v)[2][0, :, 0].tolist()) for v in (value, None)]
        assert sources[0] != sources[1], f"seed {case.seed}"
