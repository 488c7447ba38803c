"""`cls_token`: the CLS token handed to the projector at vit.out (VisionZip's layout)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import PolicyError, check
from vtdsl.lang import format_policy, parse
from vtdsl.lang import from_yaml
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")


def test_parses_formats_and_round_trips_through_yaml():
    policy = parse("at vit.out keep cls_token+cls top 10")
    assert [t.kind for t in policy.stages[0].action.terms] == ["cls_token", "top"]
    assert format_policy(policy) == "at vit.out keep cls_token + cls top 10\n"
    yaml_policy = from_yaml("stages:\n  - at: vit.out\n    keep: [cls_token, cls top 10]\n")
    assert yaml_policy == policy


def test_counts_one_token_outside_the_percentages():
    plan = check("at vit.out keep cls_token + cls top 50% then merge rest into 10", "llava-1.5-7b")
    # 576 patches: 288 by CLS attention + 10 contextual + the CLS token itself
    assert plan.projector_tokens == 1 + 288 + 10
    assert plan.llm_visual == [299] * 32
    (stage,) = plan.stages
    assert stage.tokens_in == 576 and stage.tokens_out == 299 and stage.keep_cls


def test_llm_cost_follows_the_extra_token():
    with_cls = estimate(check("at vit.out keep cls_token + cls top 63", "llava-1.5-7b"))
    patches = estimate(check("at vit.out keep cls top 64", "llava-1.5-7b"))
    # both hand 64 tokens to the projector and the LLM: same projector / LLM / KV cost
    assert with_cls.policy.llm == patches.policy.llm
    assert with_cls.policy.projector == patches.policy.projector
    assert with_cls.policy.kv_bytes == patches.policy.kv_bytes


@pytest.mark.parametrize("src, message, column", [
    ("at vit.layer4 keep cls_token + cls top 10", "inside the ViT the CLS token is always kept", 20),
    ("at llm.layer1 keep cls_token + text top 10", "the LLM only sees what the projector received", 20),
    ("at vit.out keep cls_token + cls_token + cls top 10", "'cls_token' appears twice", 29),
    ("at vit.out keep cls_token + cls top 10\nat vit.out keep uniform 5", "would treat the CLS token as a patch", 1),
])
def test_misuse_is_a_located_error(src, message, column):
    with pytest.raises(PolicyError) as err:
        check(src, "tiny-llava")
    (diag,) = err.value.diagnostics
    assert message in diag.message
    assert diag.span.column == column


def test_models_without_cls_or_with_cls_already_present_refuse_it():
    no_cls = replace(SPEC, has_cls=False)
    with pytest.raises(PolicyError, match="has no CLS token"):
        check("at vit.out keep cls_token + uniform 10", no_cls)
    full = replace(SPEC, select_strategy="full")
    with pytest.raises(PolicyError, match="already reaches the projector"):
        check("at vit.out keep cls_token + uniform 10", full)


def test_compiled_model_feeds_the_cls_row_first_and_generates():
    model = SPEC.build(device="cpu", seed=0).eval()
    img = SPEC.image_token_id
    ids = torch.tensor([[5, 6] + [img] * 576 + [7, 8]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with vc.apply("at vit.out keep cls_token + uniform 15", model), torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px,
                                 max_new_tokens=3, do_sample=False)
            kept = vc.kept_tokens(model)["vit.out#0"][0].tolist()
    finally:
        handle.remove()
    assert out.shape[1] == ids.shape[1] + 3 and torch.equal(out[:, :-3], ids)  # the caller's prompt, then 3 new
    assert kept[0] == 0 and len(kept) == 16
    # uniform 15 over 576 patches: an independent stride computation is in test_ops_select;
    # here the CLS row is what matters
    with torch.no_grad():
        hidden = model.model.vision_tower(px, output_hidden_states=True).hidden_states[SPEC.vision_feature_layer]
        expected = model.model.multi_modal_projector(hidden[:, :1])
    assert seen[0].shape[1] == 16
    torch.testing.assert_close(seen[0][:, :1], expected)
