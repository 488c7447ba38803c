"""VFlowOpt against its authors' rule (ported from SigLIP/Qwen2 to LLaVA-1.5's CLIP/LLaMA).

Reference: sihany077/VFlowOpt @ 129eeefb97d057c3507836d79e7e7bafd0bc6076,
src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py:
SigLipEncoderLayer.forward (lines 460-482: at the selection layer, the head-mean
attention; received = its mean over query rows; global tokens = received > t x the mean;
the map = the mean of the global tokens' rows, plus alpha_v x an entropy softmax, alpha_v
0 in every released setting), the tower drops SigLIP's last layer (line 829), so the
selection layer 25 (README: illava_vit_k=25) is the feature layer: layer 22 on LLaVA-1.5;
src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py
prepare_inputs_labels_for_multimodal (lines 646-672, one view per image: keep
729 - round(729 x (1 - illava_vit_r)) tokens, top by the map, in position order);
src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py forward_illava
(lines 1030-1074, the cached path generation takes: before each layer of illava_llm_k, drop
round(n x (1 - r)) visual tokens, lowest by the same ViT map, positions kept);
src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py lines 159-171 (the
10 % setting: t 39.26, illava_vit_r 0.1166, illava_llm_r [1.0, 0.6011]; README line 75:
illava_llm_k 9-18). On 576 patches: 67 after the ViT, 67 - 0 at layer 9, 67 - 27 = 40 at
layer 18.

Random tiny weights have no attention sinks, so no token would be global (VFlowOpt's map
would be NaN): the fixture gives layer 22's keys a rank-1 term that makes 2-3 patches per
image receive over 39 x the mean, as sinks do in a trained tower."""

from __future__ import annotations

import copy

import pytest
import torch

from . import plain
from .conftest import IMPLS

CLAIMS = {"vflowopt": 1.0}  # the policy's `# conformance:` line (1.0: equal kept sets)
T, VIT_R, LLM_R = 39.26492840997221, 0.11661529508161146, (1.0, 0.6011)


def vflowopt_keep(attentions, layer: int = 22) -> tuple[list[int], list[int], int]:
    """(patches kept after the ViT, patches kept from LLM layer 18 on, global token count)."""
    attn_weights_mean = attentions[layer].float().mean(1)[0]
    received_attn = attn_weights_mean.mean(0)
    global_token_indice = torch.nonzero(received_attn > T * received_attn.mean(), as_tuple=True)[0]
    combined_attn = attn_weights_mean[global_token_indice, :].mean(0)[1:]  # patch columns
    keep = 576 - round(576 * (1 - VIT_R))
    vit_kept = torch.topk(combined_attn, k=keep).indices.sort().values
    image_attn_map = combined_attn[vit_kept]
    kept = vit_kept
    n = keep
    for r_val in LLM_R:  # layers 9 and 18
        r = round(n * (1 - r_val))
        low_k = torch.sort(image_attn_map).indices[:r]
        alive = torch.ones(n, dtype=torch.bool)
        alive[low_k] = False
        kept, image_attn_map, n = kept[alive], image_attn_map[alive], n - r
    return vit_kept.tolist(), kept.tolist(), len(global_token_indice)


@pytest.fixture(scope="module")
def sunk(models):
    """{attn: the peaked model with attention sinks at ViT layer 22}."""
    g = torch.Generator().manual_seed(7)
    v = torch.randn(models["eager"].config.vision_config.hidden_size, generator=g)
    layer = models["eager"].model.vision_tower.encoder.layers[22]
    with torch.no_grad():
        h = plain.vit(models["eager"], torch.randn(1, 3, 336, 336, generator=g)).hidden_states[22]
        u = layer.self_attn.q_proj(layer.layer_norm1(h))[0].mean(0)
    term = 16 * torch.outer(u / u.norm(), v / v.norm())
    out = {}
    for attn, model in models.items():
        out[attn] = copy.deepcopy(model)
        with torch.no_grad():
            out[attn].model.vision_tower.encoder.layers[22].self_attn.k_proj.weight.add_(term)
    return out


@pytest.mark.parametrize("attn", IMPLS)
def test_vflowopt_keeps_what_vflowopt_keeps(attn, sunk, cases, compiled, once):
    for case in cases:
        vit_want, llm_want, globals_ = once(("vflowopt", case.seed),
                                            lambda: vflowopt_keep(plain.vit(sunk["eager"], case.px).attentions))
        assert globals_ >= 2, f"seed {case.seed}: the fixture's sinks are missing"
        received = plain.vit(sunk["eager"], case.px).attentions[22][0].mean(0).mean(0)[1:]
        assert sorted(received.topk(len(vit_want)).indices.tolist()) != vit_want  # not `attn` under another name
        kept, _, _ = compiled("vflowopt", attn, case, model=sunk[attn])
        vit_got = [v - 1 for v in kept["vit.out#0"]]
        assert vit_got == vit_want, f"seed {case.seed}"
        llm_got = [vit_got[p - case.image_start] for p in kept["llm.layer18#1"]]
        assert len(llm_got) == 40 and llm_got == llm_want, f"seed {case.seed}"
