"""DivPrune against its authors' rule.

Reference: vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6:
LLaVA/llava/model/llava_arch.py, pairwise_cosine_similarity and DivPrune (lines 147-171:
threshold_terms = round(ratio * n); distance 1 - cosine of the projected tokens; first
pick the largest second-smallest column entry, then max-min), applied at LAYER_INDEX 0
to the projected image tokens (lines 365-379); run_Divprune.sh line 11: SUBSET_RATIO=0.098."""

from __future__ import annotations

import pytest
import torch

from .conftest import IMPLS

CLAIMS = {"divprune": 1.0}  # the policy's `# conformance:` line (1.0: equal kept sets)


def divprune_keep(visual_feature_vectors: torch.Tensor, threshold_ratio: float = 0.098) -> list[int]:
    threshold_terms = int(round(threshold_ratio * visual_feature_vectors.shape[0]))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - norm_matrix @ norm_matrix.t()
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(cosine_matrix[s[:i]], dim=0).values
        s[i] = torch.argmax(scores)
    return sorted(s.tolist())


@pytest.mark.parametrize("attn", IMPLS)
def test_divprune_keeps_what_divprune_keeps(attn, cases, llm_in, compiled, once):
    for case in cases:
        image = llm_in(case)[0, case.image_start:case.image_start + 576]
        want = once(("divprune", case.seed), lambda: divprune_keep(image))
        kept, _, _ = compiled("divprune", attn, case)
        assert len(want) == 56
        assert sorted(p - case.image_start for p in kept["llm.layer0#0"]) == want, f"seed {case.seed}"
