"""FEATHER against its authors' rule (documented approximation: the stride-3 lattice and
its union with the top set).

Reference: markendo/FEATHER @ c2a09b2765967601054c7b1fd513ac3e94ee4fc9,
prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py: FastVLlamaModel.__init__
(line 23: ratio = 1 - fastv_ratio; lines 36-39: "no_rope_s=3" is the stride and no RoPE),
forward (lines 142-163: at the first k the top int(n * ratio) union the grid[::3, ::3]
lattice, at the second k the top int(n' * ratio^2) of the n' survivors; lines 191-199:
original positions kept; lines 207-211: the criterion of layer k is computed on the
tokens entering layer k - 1) and calculate_attention_weight (lines 250-279: layer k - 1's
input norm and q/k, RoPE skipped, the last token's softmax over the image keys only, head
mean); vlm-evaluation/scripts/eval_feather.sh line 25: k [8, 16], ratio 0.7, no_rope_s=3.
FEATHER's attention top must be kept; the kept sets are compared by Jaccard against the
floor the header states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from . import plain
from .conftest import IMPLS

CLAIMS = {"feather": 0.70}  # measured; stated in policies/feather.vt


def feather_keep(model, h: torch.Tensor, image_start: int, fastv_k=(8, 16), fastv_ratio: float = 1 - 0.7,
                 stride: int = 3) -> tuple[list[list[int]], list[int]]:
    """(each cut's kept image tokens by original position, the first cut's attention top)."""
    pos, ident, stages = torch.arange(h.shape[1]), list(range(image_start, image_start + 576)), []
    image_indices = torch.arange(image_start, image_start + 576)
    last_attention = None
    for idx in range(max(fastv_k) + 1):
        if idx in fastv_k:
            if idx == fastv_k[0]:
                top = last_attention.topk(int(len(image_indices) * fastv_ratio)).indices
                first_top = sorted((top + image_start).tolist())
                grid_size = int(math.sqrt(len(image_indices)))
                strided = np.arange(len(image_indices)).reshape(grid_size, grid_size)[::stride, ::stride].flatten()
                chosen = torch.unique(torch.cat([top, torch.from_numpy(strided)]), sorted=True)
            else:
                count = int(len(image_indices) * (fastv_ratio * fastv_ratio))
                chosen = last_attention.topk(count).indices.sort().values
            keep = torch.cat([torch.arange(image_start), chosen + image_start,
                              torch.arange(int(image_indices[-1]) + 1, h.shape[1])])
            h, pos = h[:, keep], pos[keep]
            ident = [ident[i] for i in chosen.tolist()]
            image_indices = torch.arange(len(chosen)) + image_start
            stages.append(sorted(ident))
        if idx + 1 in fastv_k:
            q, k = plain.qk(model, idx, h, None)
            logits = q[:, :, -1:] @ k[:, :, image_indices].transpose(2, 3) / math.sqrt(q.shape[-1])
            last_attention = logits.softmax(-1).mean(dim=1)[0][0]
        h = plain.decoder(model, idx, h, pos)
    return stages, first_top


@pytest.mark.parametrize("attn", IMPLS)
def test_feather_keeps_feathers_top_and_nearly_its_union(attn, ref, cases, llm_in, compiled, once):
    scores = []
    for case in cases:
        want, top = once(("feather", case.seed), lambda: feather_keep(ref, llm_in(case), case.image_start))
        kept, _, _ = compiled("feather", attn, case)
        got = [sorted(kept["llm.layer8#0"]), sorted(kept["llm.layer16#1"])]
        # the criterion is exact: the zoo's layer-8 cut holds FEATHER's whole attention top
        assert set(top) <= set(got[0]), f"seed {case.seed}"
        scores += [plain.jaccard(g, w) for g, w in zip(got, want)]
    assert min(scores) >= CLAIMS["feather"], scores
