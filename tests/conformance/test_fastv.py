"""FastV against its authors' rule.

Reference: pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1,
src/transformers/src/transformers/models/llama/modeling_llama.py, LlamaModel.forward,
lines 736-746 (inplace mode): at idx == AGG_LAYER the previous layer's attention
(`layer_outputs[1]`) is averaged over heads, its last row's image columns
[SYS_LENGTH : SYS_LENGTH + 576] ranked, the top ATTENTION_RANK kept (K = 2, 288)."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS

CLAIMS = {"fastv": 1.0}  # the policy's `# conformance:` line (1.0: equal kept sets)


def fastv_keep(model, h: torch.Tensor, image_start: int, agg_layer: int = 2, rank: int = 288) -> list[int]:
    pos = torch.arange(h.shape[1])
    for idx in range(agg_layer - 1):
        h = plain.decoder(model, idx, h, pos)
    q, k = plain.qk(model, agg_layer - 1, h, pos)  # what layer K-1 returns as its attention
    last_layer_attention_avg_last_tok = plain.attention_rows(q, k, torch.tensor([h.shape[1] - 1])).mean(1)[0, 0]
    image = last_layer_attention_avg_last_tok[image_start:image_start + 576]
    return sorted((image.topk(rank).indices + image_start).tolist())


@pytest.mark.parametrize("attn", IMPLS)
def test_fastv_keeps_what_fastv_keeps(attn, ref, cases, llm_in, compiled, once):
    for case in cases:
        want = once(("fastv", case.seed), lambda: fastv_keep(ref, llm_in(case), case.image_start))
        kept, _, _ = compiled("fastv", attn, case)
        assert sorted(kept["llm.layer2#0"]) == want, f"seed {case.seed}"
