"""PruMerge against its authors' rule (documented approximations: the attention and the
similarity it reads).

Reference: 42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a,
llava/model/multimodal_encoder/clip_encoder.py: outlier_dectection (lines 34-47: numpy
25th/75th percentiles, outliers above Q3 + 1.5 IQR, their share) and
token_prune_merge_advanced (lines 85-171: layer 23's q/k projections as one full-width
head, scale C ** -0.5, the CLS row's softmax over the patches; keep the top
int(N * share) patches; then one extra token from the dropped ones). The zoo reads
layer 22's head-mean CLS attention instead: on tiny-llava, whose layers 22 and 23 are
independent random layers, the two kept sets share no patch (Jaccard 0.0 on all seeds,
stated in the header), so what is asserted is the part the header calls exact: PruMerge's
count and selection rule applied to the zoo's score keeps exactly the zoo's patches, but
for an image with no outlier (the last test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from . import plain
from .conftest import IMPLS

CLAIMS = {"prumerge": 0.0}  # against PruMerge's own layer-23 score (the zoo reads layer 22)


def prumerge_cls_attention(model, out) -> torch.Tensor:
    """PruMerge's score: layer 23's q/k as one full-width head, the CLS row ``[1, N]``."""
    layer = model.model.vision_tower.encoder.layers[23]
    with torch.no_grad():
        x = layer.layer_norm1(out.hidden_states[23])
        desired_layer_q, desired_layer_k = layer.self_attn.q_proj(x), layer.self_attn.k_proj(x)
    attn = torch.softmax((desired_layer_q @ desired_layer_k.transpose(-2, -1)) * x.shape[-1] ** -0.5, dim=-1)
    return attn[:, 0, 1:]


def prumerge_keep(cls_attn: torch.Tensor) -> list[int]:
    n = cls_attn.shape[1]
    attn_np = cls_attn.to(dtype=torch.float32).numpy().flatten()
    q1, q3 = np.percentile(attn_np, 25), np.percentile(attn_np, 75)
    reduction_ratio = len(np.where(attn_np > q3 + 1.5 * (q3 - q1))[0]) / len(attn_np)
    return sorted(torch.topk(cls_attn, int(n * reduction_ratio), dim=1).indices[0].tolist())


def _zoo_and_rule(case, attn, vit_out, compiled):
    out = vit_out(case)
    kept, _, _ = compiled("prumerge", attn, case)
    got = sorted(v - 1 for v in kept["vit.out#0"][:-1])  # the last token is the one made of the dropped
    return got, prumerge_keep(out.attentions[22][:, :, 0, 1:].mean(1)), out


@pytest.mark.parametrize("attn", IMPLS)
def test_prumerge_count_and_selection_rule_on_the_zoos_score(attn, ref, cases, vit_out, compiled):
    for case in cases:
        got, want, out = _zoo_and_rule(case, attn, vit_out, compiled)
        if want:  # an image with no outlier: see the next test
            assert got == want, f"seed {case.seed}"
        assert plain.jaccard(got, prumerge_keep(prumerge_cls_attention(ref, out))) == CLAIMS["prumerge"]


def test_with_no_outlier_the_zoo_keeps_one_patch_where_prumerge_keeps_none(cases, vit_out, compiled):
    """The deviation policies/prumerge.vt documents: PruMerge keeps int(N * 0) = 0
    patches (only the token made of the dropped), the zoo's count rule at least 1."""
    got, want, out = _zoo_and_rule(cases[1], "eager", vit_out, compiled)
    assert want == []  # seed 1's layer-22 CLS attention has no outlier
    assert got == [int(out.attentions[22][0, :, 0, 1:].mean(0).argmax())]
