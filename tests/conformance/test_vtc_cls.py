"""VTC-CLS against its authors' rule.

Reference: THU-MIG/VTC-CLS @ e41ac9b4c0db235b3f68a84dbd6bd35f24156a7c:
llava/model/multimodal_encoder/clip_encoder.py, cls_token_only (lines 318-327): the CLS
row of the head-mean attention of every layer in attentions[start_layer:-1], summed;
llava/model/llava_arch.py, encode_images (lines 166-176): top token_num, re-sorted by
position, before the projector. vtc-cls.vt: start_layer 22, token_num 64."""

from __future__ import annotations

import pytest
import torch

from .conftest import IMPLS

CLAIMS = {"vtc-cls": 1.0}  # the policy's `# conformance:` line (1.0: equal kept sets)


def vtc_cls_keep(attentions, start_layer: int = 22, token_num: int = 64) -> list[int]:
    cls_attn_sum = torch.stack([a[0].mean(0)[0, 1:] for a in attentions[start_layer:-1]]).sum(0)
    return sorted(cls_attn_sum.topk(token_num).indices.tolist())


@pytest.mark.parametrize("attn", IMPLS)
def test_vtc_cls_keeps_what_vtc_cls_keeps(attn, cases, vit_out, compiled):
    for case in cases:
        want = vtc_cls_keep(vit_out(case).attentions)
        kept, _, _ = compiled("vtc-cls", attn, case)
        assert [v - 1 for v in kept["vit.out#0"]] == want, f"seed {case.seed}"
