"""VisionDrop against its authors' rule (documented approximation: the LLM stages' merges).

Reference: Ruixxxx/VisionDrop @ f7a944497d581aa79570f8f79e8ca91b5347a52f: the ViT stage
is its copy of VisionZip (llava/visionzip/, dominant 42 with CLS, contextual 6;
transcribed in test_visionzip.py); llava/model/modeling_llama_visiondrop.py,
visiondrop_forward (lines 1225-1243: after layer layer_idx, if layer_idx + 1 is in
layer_list) and visiondrop_rank_drop (lines 1305-1507: layer rank_layer's input norm, q/k
and RoPE on the entering tokens; the image rows' causal softmax, head mean, image
columns, mean over the image rows; top `dominant` in position order, then `contextual`
targets at stride R // contextual among the rest, joined on the head-mean keys, target +
mean of the joiners, appended after the dominant tokens; positions renumbered);
scripts/v1_5/visiondrop_eval/*.sh: layer_list [8,16,24], [[30,5],[22,4],[16,3]].
The ViT stage and the first LLM stage must be equal (same tokens in, same rule); the
later stages read tokens merged by other arithmetic and are compared by Jaccard against
the floor the header states."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS
from .test_visionzip import visionzip

LAYERS = (8, 16, 24)
COUNTS = ((42, 6), (30, 5), (22, 4), (16, 3))
CLAIMS = {"visiondrop": 1.0}  # measured: equal kept sets; stated in policies/visiondrop.vt


def visiondrop_llm_keep(model, h: torch.Tensor, image_start: int, ident: list[int]) -> list[list[int]]:
    """The LLM stages' kept tokens, each named as the ViT stage named it."""
    pos, stages = torch.arange(h.shape[1]), []
    for layer_idx in range(max(LAYERS)):
        h = plain.decoder(model, layer_idx, h, pos)
        if layer_idx + 1 not in LAYERS:
            continue
        stage = LAYERS.index(layer_idx + 1)
        n = sum(COUNTS[stage])
        dominant_num, contextual_num = COUNTS[stage + 1]
        q, k = plain.qk(model, layer_idx + 1, h, pos)
        rows = torch.arange(image_start, image_start + n)
        attention_avg_image = plain.attention_rows(q, k, rows).mean(1)[0][:, image_start:image_start + n].mean(0)
        metric = k[0].mean(0)[image_start:image_start + n]
        vision_tokens = h[0, image_start:image_start + n]
        topk_indices = attention_avg_image.topk(dominant_num).indices
        mask = torch.ones(n, dtype=torch.bool)
        mask[topk_indices] = False
        metric_normalized = metric[mask] / metric[mask].norm(dim=-1, keepdim=True)
        filtered = vision_tokens[mask]
        step = max(1, metric_normalized.shape[0] // contextual_num)
        target_indices = torch.arange(0, metric_normalized.shape[0], step)[:contextual_num]
        others = ~torch.isin(torch.arange(metric_normalized.shape[0]), target_indices)
        similarity = metric_normalized[others] @ metric_normalized[target_indices].T
        assign = torch.zeros(int(others.sum()), contextual_num).scatter_(1, similarity.argmax(dim=1, keepdim=True), 1)
        contextual = filtered[target_indices] + (assign.T @ filtered[others]) / assign.sum(0).clamp(min=1)[:, None]
        h = torch.cat([h[:, :image_start], vision_tokens[~mask][None], contextual[None], h[:, image_start + n:]], dim=1)
        rest = mask.nonzero().flatten()
        ident = [ident[i] for i in (~mask).nonzero().flatten().tolist() + rest[target_indices].tolist()]
        pos = torch.arange(h.shape[1])
        stages.append(sorted(ident))
    return stages


def _reference(model, out, case, tiny):
    with torch.no_grad():
        vit_kept, tokens = visionzip(model, out, tiny["feature_layer"], *COUNTS[0])
    h = plain.embeds(model, case.ids, tiny["image_token_id"], plain.project(model, tokens))
    return vit_kept, visiondrop_llm_keep(model, h, case.image_start, vit_kept)


@pytest.mark.parametrize("attn", IMPLS)
def test_visiondrop_keeps_what_visiondrop_keeps(attn, ref, cases, vit_out, compiled, tiny, once):
    scores = []
    for case in cases:
        vit_kept, want = once(("visiondrop", case.seed), lambda: _reference(ref, vit_out(case), case, tiny))
        kept, _, _ = compiled("visiondrop", attn, case)
        assert kept["vit.out#0"] == vit_kept, f"seed {case.seed}"
        got = [sorted(vit_kept[p - case.image_start] for p in kept[f"llm.layer{k}#{i + 1}"])
               for i, k in enumerate(LAYERS)]
        assert [len(g) for g in got] == [len(w) for w in want] == [35, 26, 19]
        assert got[0] == want[0], f"seed {case.seed}"
        scores += [plain.jaccard(g, w) for g, w in zip(got[1:], want[1:])]
    assert min(scores) >= CLAIMS["visiondrop"], scores
