"""VisionZip against its authors' package.

Reference: the `visionzip` sdist 0.1.3 on PyPI (dvlab-research/VisionZip's package; its
import needs the original `llava` package and the pre-5 CLIP attention signature, so it
is transcribed, not imported): visionzip/main.py lines 5-7 (dominant - 1 patches + CLS),
visionzip/utils.py lines 24 and 89 (the metric: layer -2's keys before the head split is
undone, mean over heads) and lines 191-192 (it is kept at layer 22 only),
visionzip/clip_encoder.py lines 42-83 (dominant by the head-summed CLS attention of
attentions[-2]; contextual targets at stride R // contextual among the rest, the others
join their most cosine-similar target, contextual = target + mean of its joiners;
CLS + dominant in position order, then the contextual tokens)."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS

SETTINGS = {"visionzip": (162, 30), "visionzip-128": (108, 20), "visionzip-64": (54, 10)}
CLAIMS = dict.fromkeys(SETTINGS, 1.0)  # the policies' `# conformance:` lines (1.0: equal kept sets)


def visionzip(model, out, feature_layer: int, dominant: int, contextual: int):
    """(kept vids in output order, output tokens ``[dominant + contextual, d]``)."""
    dominant_num = dominant - 1
    attn_weights, hidden_states = out.attentions[-2], out.hidden_states[-2]
    _, _, k, _ = plain.clip_attention(model.model.vision_tower.encoder.layers[feature_layer],
                                      out.hidden_states[feature_layer])
    metric = k.mean(1)
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros(1, 1, dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_vids = (~mask[0]).nonzero().flatten()
    rest_vids = mask[0].nonzero().flatten()
    metric_normalized = metric[mask][None] / metric[mask][None].norm(dim=-1, keepdim=True)
    hidden_filtered = hidden_states[mask][None]
    step = max(1, metric_normalized.shape[1] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = metric_normalized[:, others] @ metric_normalized[:, target_indices].transpose(1, 2)
    assign = torch.zeros(1, int(others.sum()), contextual).scatter_(2, similarity.argmax(dim=2, keepdim=True), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated_hidden = (assign.transpose(1, 2) @ hidden_filtered[:, others]) / counts
    contextual_tokens = hidden_filtered[:, target_indices] + aggregated_hidden
    tokens = torch.cat([hidden_states[0, dominant_vids], contextual_tokens[0]])
    return dominant_vids.tolist() + rest_vids[target_indices].tolist(), tokens


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", SETTINGS)
def test_visionzip_keeps_and_merges_what_visionzip_does(name, attn, ref, cases, vit_out, compiled, tiny, once):
    for case in cases:
        with torch.no_grad():
            want, tokens = once((name, case.seed), lambda: visionzip(ref, vit_out(case), tiny["feature_layer"],
                                                                     *SETTINGS[name]))
        kept, visual, _ = compiled(name, attn, case)
        assert kept["vit.out#0"] == want, f"seed {case.seed}"
        torch.testing.assert_close(visual, plain.project(ref, tokens), atol=1e-5, rtol=1e-4)
