"""HoloV against its authors' rule.

Reference: obananas/HoloV @ 1d2e65e961e698ff0e7d5bb4625489177dd9deba:
llava/model/utils.py, HoloV (lines 22-151): 16 chunks of consecutive tokens; per token
1e3 x attention + 0.09 x the variance of its in-chunk cosine similarity (projected
tokens), rescaled to the attention's mean |value|; chunk budget = floor(share of the
chunk's mean score x N), the remainder one each to the best chunks; in a chunk the top
budget by attention; a chunk whose budget reaches its size keeps all its tokens (lines
120-122: the overflow is lost and the output zero-padded, lines 138-143);
llava/model/llava_arch.py line 143 (head-mean attention) and line 239 (num_patches=16,
new_image_token_num=64); llava/model/multimodal_encoder/clip_encoder.py lines 35-46
(attentions[-2] CLS row, hidden_states[-2] patches). The zoo gives an overflowing chunk's
excess to the best tokens elsewhere: a superset, checked where overflow happens."""

from __future__ import annotations

import pytest
import torch

from . import plain
from .conftest import IMPLS

SETTINGS = {"holov": 64, "holov-128": 128, "holov-192": 192}
CLAIMS = dict.fromkeys(SETTINGS, 1.0)  # the policies' `# conformance:` lines (1.0: equal kept sets)


def holov_keep(image_token: torch.Tensor, image_attention: torch.Tensor, new_image_token_num: int,
               num_patches: int = 16, alpha: float = 0.09, esp: float = 1e-6) -> list[int]:
    n = image_token.shape[0]
    size = n // num_patches  # 576 divides evenly: no remainder chunks
    patch_scores = []
    for p in range(num_patches):
        tokens, attn = image_token[p * size:(p + 1) * size], image_attention[p * size:(p + 1) * size]
        f = tokens / (tokens.norm(dim=1, keepdim=True) + esp)
        s = (f @ f.T) * (1 - torch.eye(size))
        mean_sim = s.sum(dim=1) / (size - 1)
        var_sim = ((s - mean_sim[:, None]) ** 2).sum(dim=1) / (size - 1)
        scaled = attn * 1e3
        var_scaled = var_sim * (scaled.abs().mean() / (var_sim.abs().mean() + esp))
        patch_scores.append((scaled + alpha * var_scaled).mean())
    weights = torch.stack(patch_scores) / (torch.stack(patch_scores).sum() + esp)
    allocated = (weights * new_image_token_num).floor().long()
    remaining = new_image_token_num - int(allocated.sum())
    if remaining > 0:
        for idx in torch.topk(weights, k=min(remaining, num_patches)).indices[:remaining]:
            allocated[idx] += 1
    kept = []
    for p, alloc in enumerate(allocated.tolist()):
        chunk = torch.arange(p * size, (p + 1) * size)
        if alloc >= size:
            kept += chunk.tolist()
        elif alloc > 0:
            kept += chunk[torch.topk(image_attention[chunk], k=alloc).indices].tolist()
    return sorted(kept)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("name", SETTINGS)
def test_holov_keeps_what_holov_keeps(name, attn, ref, cases, vit_out, compiled, once):
    for case in cases:
        out = vit_out(case)
        projected = plain.project(ref, out.hidden_states[-2][:, 1:])[0]
        want = once((name, case.seed), lambda: holov_keep(projected, out.attentions[-2][0].mean(0)[0, 1:],
                                                          SETTINGS[name]))
        kept, _, _ = compiled(name, attn, case)
        assert sorted(v - 1 for v in kept["vit.out#0"]) == want, f"seed {case.seed}"


def test_on_chunk_overflow_the_zoo_keeps_holovs_tokens_and_fills_the_rest(sharpened, cases, compiled):
    """Budget 400 on very peaked attention: some chunk's share passes its 36 tokens."""
    model = sharpened(200.0)["eager"]
    scores = []
    for case in cases:
        out = plain.vit(model, case.px)
        want = holov_keep(plain.project(model, out.hidden_states[-2][:, 1:])[0], out.attentions[-2][0].mean(0)[0, 1:],
                          400)
        kept, _, _ = compiled("at vit.out keep cls top 400 per chunk 16 proportional", "eager", case, model)
        got = [v - 1 for v in kept["vit.out#0"]]
        assert len(got) == 400 and set(want) <= set(got), f"seed {case.seed}"
        scores.append(len(want) / 400)
    assert min(scores) >= 0.78 and min(scores) < 1, scores  # policies/holov*.vt
