"""The hand-run plumbing the references share reproduces the plain model: a CLIP block,
the LLaMA layers at explicit positions, and their attention rows."""

from __future__ import annotations

import torch

from . import plain


def test_clip_blocks_by_hand_match_the_vision_tower(ref, cases, vit_out):
    out = vit_out(cases[0])
    h = out.hidden_states[0]
    for i, layer in enumerate(ref.model.vision_tower.encoder.layers[:3]):
        with torch.no_grad():
            h, probs, *_ = plain.clip_block(layer, h)
        torch.testing.assert_close(h, out.hidden_states[i + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs, out.attentions[i], atol=1e-6, rtol=1e-5)


def test_llama_layers_by_hand_match_the_plain_forward(ref, cases, llm_in):
    case = cases[1]
    with torch.no_grad():
        out = ref(input_ids=case.ids, pixel_values=case.px, output_attentions=True, output_hidden_states=True)
    h = llm_in(case)
    torch.testing.assert_close(h, out.hidden_states[0])
    pos = torch.arange(h.shape[1])
    for i in range(3):
        q, k = plain.qk(ref, i, h, pos)
        rows = torch.arange(h.shape[1] - 2, h.shape[1])
        torch.testing.assert_close(plain.attention_rows(q, k, rows), out.attentions[i][:, :, rows], atol=1e-6,
                                   rtol=1e-5)
        h = plain.decoder(ref, i, h, pos)
        torch.testing.assert_close(h, out.hidden_states[i + 1], atol=1e-5, rtol=1e-5)
