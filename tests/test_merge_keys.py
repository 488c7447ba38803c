"""`then add rest into N by keys`: VisionZip's contextual merge. The tokens no term kept
are split into N targets (uniform stride) and the others, which join the target whose
attention keys (head mean, of the layer the first term reads) are most cosine-similar; a
contextual token is its target plus the mean of those joining it (`add`; `merge`: the
group mean). The reference follows VisionZip's released arithmetic on the plain model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import first_error

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id
VISIONZIP = "at vit.out keep cls_token + cls top 53 then add rest into 10 by keys"


def test_parses_formats_and_round_trips():
    policy = parse("at vit.out keep cls top 8 then add rest into 4  by keys\n"
                   "at llm.layer2 keep text top 8 then add rest into 2")
    assert format_policy(policy) == ("at vit.out keep cls top 8 then add rest into 4 by keys\n"
                                     "at llm.layer2 keep text top 8 then add rest into 2\n")
    assert from_yaml(to_yaml(policy)) == policy
    assert "add_rest_into: 4" in to_yaml(policy) and "merge_by: keys" in to_yaml(policy)


@pytest.mark.parametrize("src, message, column", [
    ("at llm.layer2 keep text top 64 then merge rest into 8 by keys", "this stage is in the LLM", 53),
    ("at vit.out keep uniform 64 then merge rest into 8 by keys", "the first term must be one ViT attention score",
     49),
])
def test_misuse_is_a_located_check_error(src, message, column):
    diag = first_error(src, "llava-1.5-7b")
    assert message in diag.message and diag.span.column == column


def test_matching_on_keys_costs_the_head_width():
    keys = estimate(check("at vit.out keep cls top 54 then merge rest into 10 by keys", "llava-1.5-7b"))
    tokens = estimate(check("at vit.out keep cls top 54 then merge rest into 10", "llava-1.5-7b"))
    # R = 522 left over, 512 of them matched against 10 targets: on 64-wide keys, not 1024-wide tokens
    assert tokens.policy.flops - keys.policy.flops == 2 * 512 * 10 * (1024 - 64)


def _visionzip_reference(model, px: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip (its `main.py` / `utils.py`): CLS attention of layer -2 picks `dominant`
    patches; CLS + those, then `contextual` tokens from the rest: targets at stride
    R // contextual, the others join their most key-similar target (layer -2 keys, head
    mean, normalised), contextual = target + mean of the joiners; through the projector."""
    tower = model.model.vision_tower
    layer = tower.encoder.layers[SPEC.feature_layer_index]
    with torch.no_grad():
        out = tower(px, output_attentions=True, output_hidden_states=True)
        h_in = out.hidden_states[SPEC.feature_layer_index][0]
        feats = out.hidden_states[SPEC.feature_layer_index + 1][0]  # CLS + 576 patches
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(layer.layer_norm1(h_in)).view(577, heads, -1).mean(1)
        cls = out.attentions[SPEC.feature_layer_index][0, :, 0, 1:].sum(0)
        top = sorted((cls.argsort(descending=True)[:dominant] + 1).tolist())
        rest = [i for i in range(1, 577) if i not in top]
        step = max(1, len(rest) // contextual)
        targets = [rest[j] for j in range(0, len(rest), step)][:contextual]
        others = [i for i in rest if i not in targets]
        metric = F.normalize(keys, dim=-1)
        choice = (metric[others] @ metric[targets].T).argmax(1).tolist()
        ctx = []
        for t_pos, t in enumerate(targets):
            joined = [o for o, c in zip(others, choice) if c == t_pos]
            ctx.append(feats[t] + (feats[joined].mean(0) if joined else 0))
        tokens = torch.cat([feats[[0] + top], torch.stack(ctx)])
        return model.model.multi_modal_projector(tokens[None])[0]


def test_compiled_merge_follows_visionzips_arithmetic():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(17))
    want = _visionzip_reference(model, px, 53, 10)
    with vc.apply(VISIONZIP, model), torch.no_grad():
        got = model.model.get_image_features(pixel_values=px).pooler_output
    got = torch.cat(list(got)) if isinstance(got, (list, tuple)) else got[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the plain group mean on the tokens' own similarity gives other contextual tokens
    with vc.apply("at vit.out keep cls_token + cls top 53 then merge rest into 10", model), torch.no_grad():
        plain = model.model.get_image_features(pixel_values=px).pooler_output
    plain = torch.cat(list(plain)) if isinstance(plain, (list, tuple)) else plain[0]
    assert not torch.allclose(plain[54:], want[54:], atol=1e-3)
