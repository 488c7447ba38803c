"""PDrop (all three stages) against its authors' rule.

Reference: Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a,
llava/model/modeling_llama_pdrop.py: pdrop_forward (lines 1219-1237: after layer
layer_idx, if layer_idx + 1 is in layer_list, rank and drop) and pdrop_rank_drop
(lines 1291-1468): layer rank_layer's own input norm, q/k projections and RoPE at the
current position_ids on the tokens entering it; the last prompt token's causal softmax row
(line 1390: prompt_total_len - 1), head mean, image columns, top
int(576 * ratio[stage + 1]); the survivors get positions 0..n-1 (line 1446).
scripts/v1_5/pdrop_eval/*.sh: layer_list [8,16,24], ratios 0.5, 0.25, 0.125."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS

SCHEDULES = {"pdrop": ((8, 16, 24), (288, 144, 72)), "pdrop-192": ((2, 8, 16), (320, 182, 101)),
             "pdrop-128": ((2, 8, 16), (240, 102, 43)), "pdrop-64": ((2, 8, 16), (112, 20, 4))}
CLAIMS = dict.fromkeys(SCHEDULES, 1.0)  # the policies' `# conformance:` lines (1.0: equal kept sets)


def pdrop_keep(model, h: torch.Tensor, image_start: int, layer_list, keep_lengths) -> list[list[int]]:
    """Each stage's kept image tokens, as positions in the original prompt."""
    pos = torch.arange(h.shape[1])
    alive = list(range(image_start, image_start + 576))  # original position of each current image row
    stages = []
    for layer_idx in range(max(layer_list)):
        h = plain.decoder(model, layer_idx, h, pos)
        rank_layer = layer_idx + 1
        if rank_layer not in layer_list:
            continue
        keep = keep_lengths[layer_list.index(rank_layer)]
        q, k = plain.qk(model, rank_layer, h, pos)
        last = torch.tensor([h.shape[1] - 1])
        row = plain.attention_rows(q, k, last).mean(1)[0, 0]
        top = row[image_start:image_start + len(alive)].topk(keep).indices.sort().values
        h = torch.cat([h[:, :image_start], h[:, image_start + top], h[:, image_start + len(alive):]], dim=1)
        alive = [alive[i] for i in top.tolist()]
        pos = torch.arange(h.shape[1])
        stages.append(alive)
    return stages


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", SCHEDULES)
def test_pdrop_keeps_what_pdrop_keeps(name, attn, ref, cases, llm_in, compiled, once):
    layers, counts = SCHEDULES[name]
    for case in cases:
        want = once((name, case.seed), lambda: pdrop_keep(ref, llm_in(case), case.image_start, layers, counts))
        kept, _, _ = compiled(name, attn, case)
        got = [sorted(kept[f"llm.layer{k}#{i}"]) for i, k in enumerate(layers)]
        assert [len(g) for g in got] == list(counts)
        assert got == want, f"seed {case.seed}"
