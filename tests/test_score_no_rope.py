"""`no_rope`: an LLM attention criterion computed without rotary embeddings (FEATHER)."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.ir import PolicyError, check
from vtdsl.lang import PolicyError as LangError
from vtdsl.lang import format_policy, parse
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


def test_parses_formats_and_is_refused_where_meaningless():
    policy = parse("at llm.layer8 keep text( no_rope ) top 4 + attn(visual, max, no_rope) top 1")
    assert format_policy(policy) == "at llm.layer8 keep text(no_rope) top 4 + attn(visual, max, no_rope) top 1\n"
    with pytest.raises(LangError, match="reads no attention"):
        parse("at llm.layer8 keep norm(no_rope) top 4")
    with pytest.raises(PolicyError, match="the ViT has no rotary position embeddings"):
        check("at vit.out keep cls(no_rope) top 4", "llava-1.5-7b")


def test_compiled_ranks_by_the_last_token_attention_without_rope():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10, 11]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                    output_hidden_states=True, output_attentions=True)
        layer = model.model.language_model.layers[1]
        x = layer.input_layernorm(out.hidden_states[1])  # what enters layer 1
        cfg = SPEC.llm
        q = layer.self_attn.q_proj(x).view(1, -1, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(1, -1, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        k = k.repeat_interleave(cfg.heads // cfg.kv_heads, dim=1)
        logits = q[:, :, -1:] @ k.transpose(-1, -2) * cfg.head_dim ** -0.5  # the last row sees every key
        plain = logits.softmax(-1)[0, :, 0].mean(0)
    img = list(range(3, 579))
    values = plain[img].tolist()
    order = sorted(range(576), key=lambda i: -values[i])
    k_keep = next(k for k in range(100, 400) if values[order[k - 1]] - values[order[k]] > 1e-6)
    want = sorted(img[i] for i in order[:k_keep])
    with vc.apply(f"at llm.layer2 keep text(no_rope) top {k_keep}", model), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px)
        kept = sorted(vc.kept_tokens(model)["llm.layer2#0"][0].tolist())
    assert kept == want
    # with RoPE (eager attention weights of layer 1) the choice differs: the test tells them apart
    with_rope = out.attentions[1][0, :, -1, img].mean(0).tolist()
    rope_order = sorted(range(576), key=lambda i: -with_rope[i])
    assert sorted(img[i] for i in rope_order[:k_keep]) != want


def test_image_keys_softmax_over_the_image_only():
    """`text(image_keys)`: each head's softmax over the image tokens' keys alone, i.e. the
    full attention row renormalised over the image columns, then the head mean (FEATHER)."""
    import torch

    import vtdsl.compiler as vc
    from vtdsl.models import get_spec
    from plain_refs import sharpen_llm

    spec = get_spec("tiny-llava")
    img = spec.image_token_id
    model = sharpen_llm(spec.build(device="cpu", attn_implementation="eager", seed=0).eval())
    # a long question: the heads give the text a different share of their attention
    question = list(range(5, 205))
    ids = torch.tensor([[5, 6, 7] + [img] * 576 + question, [0, 0, 5] + [img] * 576 + question])
    mask = (ids != 0).long()
    px = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(16))
    with torch.no_grad():
        att = model(input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True).attentions[1]
    rows = att[:, :, -1, 3:579]  # [B, H, 576]
    renorm = (rows / rows.sum(-1, keepdim=True)).mean(1)
    plain = rows.mean(1)
    orders = [renorm[b].argsort(descending=True) for b in range(2)]
    k = next(k for k in range(80, 300)
             if all(float(renorm[b, orders[b][k - 1]] - renorm[b, orders[b][k]]) > 1e-7 for b in range(2)))
    want = [sorted(3 + i for i in orders[b][:k].tolist()) for b in range(2)]
    assert sorted(3 + i for i in plain[0].argsort(descending=True)[:k].tolist()) != want[0]  # it matters
    with vc.apply(f"at llm.layer2 keep text(image_keys) top {k}", model), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=px)
        got = vc.kept_tokens(model)["llm.layer2#0"]
    assert [sorted(row.tolist()) for row in got] == want
