"""DyVTE's exit step against its authors' code, at the zoo's fixed exit.

Reference: DoubtedSteam/DyVTE @ b4a33966da27c913681754b99b2998a7cfaa4001,
llava/model/language_model/modeling_llama.py, LlamaModel.forward (lines 720-762): after
layer idx, when the trained visual gate says exit, every visual token leaves the hidden
states, and their rows leave position_ids and the mask: the rest keep their positions.
The gate itself (visual_gates_router, trained by scripts/v1_5/finetune_visual_gate.sh) is
not reproducible here; dyvte.vt fixes the exit after layer 15 (`at llm.layer16 drop
all`), so the reference forces the gate's decision there and compares the next-token
logits."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS

CLAIMS = {"dyvte": 1.0}  # equal logits after the forced exit step


def dyvte_logits(model, h: torch.Tensor, image_start: int, exit_layer: int = 15) -> torch.Tensor:
    pos = torch.arange(h.shape[1])
    for idx in range(len(model.model.language_model.layers)):
        h = plain.decoder(model, idx, h, pos)
        if idx == exit_layer:
            h = torch.cat([h[:, :image_start], h[:, image_start + 576:]], dim=1)
            pos = torch.cat([pos[:image_start], pos[image_start + 576:]])
    with torch.no_grad():
        return model.lm_head(model.model.language_model.norm(h))[0, -1]


@pytest.mark.parametrize("attn", IMPLS)
def test_dyvte_exit_matches_the_released_exit_step(attn, ref, cases, llm_in, compiled, once):
    for case in cases:
        kept, _, logits = compiled("dyvte", attn, case)
        assert kept["llm.layer16#0"] == []
        want = once(("dyvte", case.seed), lambda: dyvte_logits(ref, llm_in(case), case.image_start))
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
