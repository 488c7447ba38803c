"""PruMerge against its authors' rule (documented approximation: the similarity its merge
reads, which changes merged values, not the kept patches).

Reference: 42Shawn/LLaVA-PruMerge @ 097c04116a58465e4bcb58cec44a94018a68ff1a,
llava/model/multimodal_encoder/clip_encoder.py: outlier_dectection (lines 34-47: numpy
25th/75th percentiles, outliers above Q3 + 1.5 IQR, their share) and
token_prune_merge_advanced (lines 85-171: layer 23's q/k projections as one full-width
head, scale C ** -0.5, the CLS row's softmax over the patches; keep the top
int(N * share) patches; then one extra token from the dropped ones). The zoo reads the
same score (`cls(whole)@vit.layer23`) and keeps exactly PruMerge's patches, but for an
image with no outlier (the last test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from . import plain
from .conftest import IMPLS

CLAIMS = {"prumerge": 1.0}


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


def _zoo_and_rule(case, attn, ref, vit_out, compiled):
    out = vit_out(case)
    kept, _, _ = compiled("prumerge", attn, case)
    got = sorted(v - 1 for v in kept["vit.out#0"][:-1])  # the last token is the one made of the dropped
    return got, prumerge_keep(prumerge_cls_attention(ref, out)), out


@pytest.mark.parametrize("attn", IMPLS)
def test_prumerge_keeps_the_authors_patches(attn, ref, cases, vit_out, compiled):
    checked = 0
    for case in cases:
        got, want, _ = _zoo_and_rule(case, attn, ref, vit_out, compiled)
        if want:  # an image with no outlier: see the next test
            assert plain.jaccard(got, want) == CLAIMS["prumerge"], f"seed {case.seed}"
            checked += 1
    assert checked >= 2


def test_with_no_outlier_the_zoo_keeps_one_patch_where_prumerge_keeps_none(ref, cases, vit_out, compiled):
    """The deviation policies/prumerge.vt documents: PruMerge keeps int(N * 0) = 0
    patches (only the token made of the dropped), the zoo's count rule at least 1."""
    got, want, out = _zoo_and_rule(cases[0], "eager", ref, vit_out, compiled)
    assert want == []  # seed 0's layer-23 CLS attention has no outlier
    assert got == [int(prumerge_cls_attention(ref, out)[0].argmax())]
