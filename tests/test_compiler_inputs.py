"""Prompt placeholders follow the compiled visual-token count; labels follow pruning."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vtdsl.compiler as vc
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
IMG = 255
SIZE, PATCH = 336, 14
P = (SIZE // PATCH) ** 2  # 576 placeholders per image (strategy "default": CLS dropped)


@pytest.fixture(scope="module")
def model():
    return SPEC.build(device="cpu", attn_implementation="sdpa", seed=0).eval()


def test_rewrite_inputs_shrinks_each_run_and_repads_left():
    ids = torch.tensor([
        [0, 0, 0, 0, 1, IMG, IMG, IMG, IMG, 2],
        [3, IMG, IMG, IMG, IMG, IMG, IMG, IMG, IMG, 4],  # two adjacent images: one run of 8
    ])
    mask = (ids != 0).long()
    labels = torch.where(ids == IMG, -100, ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = vc.rewrite_inputs(ids, mask, labels, pos, image_token_id=IMG, from_count=4, to_count=1, pad_token_id=0)
    # sample 0 loses 3 placeholders, sample 1 (two images) 6: it is re-padded on the left
    assert out["input_ids"].tolist() == [[0, 0, 0, 0, 1, IMG, 2], [0, 0, 0, 3, IMG, IMG, 4]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[0, 0, 0, 0, 1, -100, 2], [-100, -100, -100, 3, -100, -100, 4]]
    assert out["position_ids"].tolist() == [[1, 1, 1, 1, 0, 1, 2], [1, 1, 1, 0, 1, 2, 3]]
    same = vc.rewrite_inputs(ids, mask, image_token_id=IMG, from_count=4, to_count=4)
    assert same["input_ids"] is ids
    with pytest.raises(ValueError, match="not a multiple"):
        vc.rewrite_inputs(ids[:, :8], image_token_id=IMG, from_count=3, to_count=1)


def test_processor_patch_uses_llava_processor_formula(model):
    from transformers import LlavaProcessor

    proc = types.SimpleNamespace(patch_size=PATCH, num_additional_image_tokens=1,
                                 vision_feature_select_strategy="default", image_token="<image>")
    image = {"pixel_values": [np.zeros((3, SIZE, SIZE), dtype=np.float32)]}
    assert LlavaProcessor.replace_image_token(proc, image, 0) == "<image>" * P
    with vc.apply("at vit.out keep cls top 8 then merge rest into 2", model):
        with vc.processor_for(proc, model):
            assert LlavaProcessor.replace_image_token(proc, image, 0) == "<image>" * 10
    assert proc.num_additional_image_tokens == 1


def test_forward_rewrites_prompt_and_handles_two_images_per_sample(model):
    ids = torch.tensor([[7] + [IMG] * P + [8, 9] + [IMG] * P + [10]])
    px = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with vc.apply("at vit.layer2 keep cls top 8; at llm.layer1 keep text top 4", model):
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, use_cache=True)
            gen = model.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
        kept = vc.kept_tokens(model)
    # 4 text + 2 images x 8 placeholders; from layer 1 on, 4 per image
    assert [out.cache.layers[j].keys.shape[-2] for j in range(SPEC.llm.layers)] == [20] + [12] * (SPEC.llm.layers - 1)
    assert kept["vit.layer2#0"].shape == (2, 8) and kept["llm.layer1#1"].shape == (1, 8)
    assert gen.shape[1] == ids.shape[1] + 3 and torch.equal(gen[:, :-3], ids)  # the caller's prompt comes back


def test_labels_give_the_loss_of_the_kept_positions(model):
    ids = torch.tensor([[5, 6, 7] + [IMG] * P + [8, 9, 10, 11]])
    labels = torch.where(ids == IMG, -100, ids)
    px = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with vc.apply("at llm.layer2 keep text top 25%", model):
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, labels=labels)
        kept_img = vc.kept_tokens(model)["llm.layer2#0"][0].tolist()
    rows = sorted(set(range(3)) | set(kept_img) | set(range(3 + P, 3 + P + 4)))
    lab = labels[0, rows]
    want = F.cross_entropy(out.logits[0, :-1].float(), lab[1:], ignore_index=-100)
    assert out.logits.shape[1] == len(rows) == 3 + P // 4 + 4
    torch.testing.assert_close(out.loss, want)
