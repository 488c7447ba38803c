"""FlowCut against its authors' package.

Reference: the `flowcut` wheel 1.0.2 on PyPI (TungChintao/FlowCut's package; its import
needs the original `llava` package and patches the pre-5 CLIP classes, so it is
transcribed, not imported): flowcut/utils_flowcut.py compute_score (lines 20-27) and
adaptive_prune_ratio (lines 30-42); flowcut/modeling_clip_flowcut.py CLIPAttention_forward
(lines 37-40, 67-69, 97: CLS attention, softmax of the CLS value with every value, head
means), CLIPEncoderLayer_forward (lines 137-165: after the block, while more than
`target` tokens remain, update the running score 0.5 old + 0.5 new; when rpl is even cut
to max(n - prune, target) tokens, CLS kept) and CLIPEncoder_forward (line 203:
rpl = select_layer - idx - 1, select_layer 22); flowcut/main.py lines 34-39 (target =
target_num + 1 with select_feature 'patch')."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS

SETTINGS = {"flowcut": 64, "flowcut-128": 128, "flowcut-192": 192}
CLAIMS = dict.fromkeys(SETTINGS, 1.0)  # the policies' `# conformance:` lines (1.0: equal kept sets)


def flowcut_keep(model, h: torch.Tensor, target_num: int, select_layer: int = 22) -> dict[int, list[int]]:
    """The vids (1 + patch index) of the tokens each cut keeps, by the layer they enter."""
    target = target_num + 1
    vids = torch.arange(577)
    cumulative_scores, cuts = None, {}
    for idx, layer in enumerate(model.model.vision_tower.encoder.layers[:select_layer]):
        rpl = select_layer - idx - 1
        h, probs, _, v, _ = plain.clip_block(layer, h)
        if h.shape[1] <= target:
            continue
        cls_attention = probs[:, :, 0, 1:].mean(dim=1)
        semantic_attn = (v[:, :, :1] @ v.transpose(-1, -2)).softmax(-1).mean(1)[:, 0]
        relation = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
        semantic = semantic_attn[:, 1:] / semantic_attn[:, 1:].sum(dim=-1, keepdim=True)
        scores = (relation + semantic) * torch.norm(v.mean(1)[:, 1:], p=1, dim=-1)
        cumulative_scores = scores if cumulative_scores is None else 0.5 * cumulative_scores + 0.5 * scores
        if rpl % 2:
            continue
        if rpl:
            n = cls_attention.shape[-1]
            prob = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
            entropy_ratio = -torch.sum(prob * torch.log(prob), dim=-1) / torch.log(torch.tensor(n))
            prune_num = int(((n - (target - 1)) / rpl ** 0.5 * (1 - entropy_ratio ** 2)).round())
        else:
            prune_num = h.shape[1]
        target_now = max(h.shape[1] - prune_num, target)
        keep_indices = torch.topk(cumulative_scores, target_now - 1, dim=1).indices.sort(dim=1).values
        h = torch.cat([h[:, :1], h[:, 1:][:, keep_indices[0]]], dim=1)
        cumulative_scores = cumulative_scores.gather(1, keep_indices)
        vids = torch.cat([vids[:1], vids[1:][keep_indices[0]]])
        cuts[idx + 1] = vids[1:].tolist()
    return cuts


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("sharpness", ["peaked", "sharp"])
def test_flowcut_keeps_what_flowcut_keeps(sharpness, name, attn, models, sharpened, cases, compiled, once):
    chosen = models if sharpness == "peaked" else sharpened(64.0)
    removed = 0
    for case in cases:
        with torch.no_grad():
            embedded = chosen["eager"].model.vision_tower.pre_layrnorm(
                chosen["eager"].model.vision_tower.embeddings(case.px))
            want = once((sharpness, name, case.seed), lambda: flowcut_keep(chosen["eager"], embedded, SETTINGS[name]))
        kept, _, _ = compiled(name, attn, case, chosen[attn])
        got = {int(k.split("#")[0].removeprefix("vit.layer")): v for k, v in kept.items()}
        assert len(want[22]) == SETTINGS[name]
        assert got == want, f"seed {case.seed}"
        removed += 576 - len(want[20])
    if sharpness == "sharp":  # the entropy counts did remove tokens before the last cut
        assert removed > 0
