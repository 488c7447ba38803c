"""LLaVA-NeXT (anyres): spec counts, cost = FlopCounterMode, and compiled tiny-llava-next
runs against plain references written here (loops over the HF layers, eager attention,
an uncompiled model fed hand-built embeddings), never vtdsl's own ops."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.cost import estimate, estimate_counts
from vtdsl.ir import check
from vtdsl.lang.errors import PolicyError
from vtdsl.models import get_spec

from family_runs import anyres_inputs, assert_clip_vit_stage_matches
from tiny_clip import text_encoder_kwargs
from plain_refs import (plain_copy, clip_crop_features, image_zoo, first_error, last_query_attention, masked_generate, prune_to_top,
                        sharpened_pair, top_rows)

SPEC = get_spec("tiny-llava-next")
IMG = SPEC.image_token_id
CROP = 56  # pixels per crop; 4x4 patches of 14
SIDE = 4  # patches per crop side
BASE = SIDE * SIDE  # 16 tokens of the base view
ROWS, WIDTH = 2 * SIDE, 2 * SIDE + 1  # the 2x2 grid crops' map: 8 rows of 8 tokens + a newline
N_IMG = BASE + ROWS * WIDTH  # 88
ZOO = image_zoo()  # video methods (evs.vt) run on video in tests/conformance/test_evs.py


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def inputs(batch: int):
    """One 112x112 image per prompt (base + 2x2 crops); batch 2 is left-padded."""
    return anyres_inputs(SPEC, (2 * CROP, 2 * CROP), batch, seed=3)


def crop_of(i: int) -> int:
    """Crop of the i-th visual token of an intact 112x112 image (newline: its row's last crop)."""
    if i < BASE:
        return 0
    r, c = divmod(i - BASE, WIDTH)
    return 1 + (r // SIDE) * 2 + min(c, 2 * SIDE - 1) // SIDE


def fresh_copy(model, attn="eager"):
    return plain_copy(SPEC, model, attn)


# ---------------------------------------------------------------------------- spec and cost
def test_counts_follow_the_anyres_layout():
    big = get_spec("llava-next-7b")
    assert (big.vit_crops, big.anyres_grid) == (5, (2, 2))
    assert big.projector_tokens == 5 * 576
    assert big.image_tokens == 576 + 48 * (48 + 1)  # base view + 48 rows of 48 tokens and a newline
    assert (SPEC.projector_tokens, SPEC.image_tokens) == (5 * BASE, N_IMG)
    # transformers' own packing agrees (unpadding a square image removes nothing)
    model = SPEC.build(device="cpu", seed=0)
    batch = inputs(1)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"],
                                               image_sizes=batch["image_sizes"]).pooler_output
    assert [f.shape[0] for f in feats] == [N_IMG]


def test_cost_of_llava_next_7b_equals_flop_counter_on_meta():
    spec = get_spec("llava-next-7b")
    model = spec.build(device="meta", attn_implementation="eager")
    text = 64
    ids = torch.cat([torch.full((1, spec.image_tokens), spec.image_token_id), torch.ones(1, text, dtype=torch.long)], 1)
    px = torch.zeros(1, 5, 3, 336, 336, device="meta", dtype=model.dtype)
    check_off = mock.patch("transformers.models.llava_next.modeling_llava_next.torch_compilable_check",
                           lambda *a, **k: None)
    with check_off, torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids.to("meta"), pixel_values=px, image_sizes=torch.tensor([[672, 672]]), logits_to_keep=1)
    vit_layer = lambda n: 2 * n * (4 * 1024**2 + 2 * n * 1024 + 2 * 1024 * 4096)  # noqa: E731
    llm_layer = lambda n: 2 * n * (4 * 4096**2 + 2 * n * 4096 + 3 * 4096 * 11008)  # noqa: E731
    independent = (5 * (24 * vit_layer(577) + 2 * 576 * 3 * 14 * 14 * 1024)
                   + 2 * 2880 * (1024 * 4096 + 4096 * 4096)
                   + 32 * llm_layer(2928 + text) + 2 * 4096 * 32064)
    assert counter.get_total_flops() == independent
    report = estimate_counts(spec, [577] * 24, 2880, [2928] * 32, text)
    assert report.baseline.flops == independent


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at vit.layer2 keep cls top 8",
    "at vit.out keep cls top 8 then merge rest into 2; at llm.layer1 keep text top 20 per crop",
    "at vit.out pool 2x2",
    "at llm.layer0 keep diverse 30",
])
def test_compiled_flops_equal_the_cost_model(models, src):
    model = models["eager"]
    batch = inputs(1)
    with vc.apply(src, model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch)
    assert counter.get_total_flops() == estimate(check(src, SPEC), text_tokens=6, logits="all").flops


# ---------------------------------------------------------------------------- LLM stages
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_generate_matches_masked_reference(models, attn, batch):
    model = models[attn]
    batch_inputs = inputs(batch)
    ref = fresh_copy(model)
    att = last_query_attention(ref, batch_inputs, layer=1)
    kept, pruned = prune_to_top(att, batch_inputs["input_ids"], IMG, N_IMG // 2)
    want = masked_generate(ref, batch_inputs, pruned, from_layer=2, new_tokens=6)
    with vc.apply("at llm.layer2 keep text top 50%", model):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"], kept)
    assert torch.equal(got, want)


def test_per_crop_at_an_llm_site_gives_every_crop_its_share(models):
    """`per crop` on the packed LLM tokens: 40 tokens over 5 crops = the 8 best of each crop
    (crops read from the layout: base view, then rows of the grid crops + newline)."""
    model = models["eager"]
    batch_inputs = inputs(2)
    ref = fresh_copy(model)
    att = last_query_attention(ref, batch_inputs, layer=0)
    ids = batch_inputs["input_ids"]
    kept, pruned = [], []
    for b in range(2):
        rows = (ids[b] == IMG).nonzero().flatten()
        crop = torch.tensor([crop_of(i) for i in range(N_IMG)])
        chosen = torch.cat([top_rows(att[b], rows[crop == c], 8) for c in range(5)]).sort().values
        kept.append(chosen)
        pruned.append(rows[~torch.isin(rows, chosen)])
    want = masked_generate(ref, batch_inputs, pruned, from_layer=1, new_tokens=5)
    with vc.apply("at llm.layer1 keep text top 40 per crop", model):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["llm.layer1#0"], torch.stack(kept))
    assert torch.equal(got, want)
    # the even split differs from a plain top 40 here (otherwise the test proves nothing)
    plain = torch.stack([top_rows(att[b], (ids[b] == IMG).nonzero().flatten(), 40) for b in range(2)])
    assert not torch.equal(plain, torch.stack(kept))


# ---------------------------------------------------------------------------- ViT stages
def test_vit_stage_prunes_every_crop_and_generate_follows(models):
    model = models["eager"]
    assert_clip_vit_stage_matches(model, fresh_copy(model), inputs(2), IMG, crops=5)


# ---------------------------------------------------------------------------- check time
@pytest.mark.parametrize("src, at, words", [
    ("at llm.layer2 pool 2x2", "pool", "not one token grid"),
    ("at llm.layer2 keep anchors top 10% + buffers", "buffers", "'buffers' at llm.layer2"),
    ("at llm.layer2 keep text top 20 per region 2x2", "per region", "'per region' at llm.layer2"),
    ("at llm.layer2 keep cls@vit.layer2 top 20", "cls@", "scores ViT crop patches"),
])
def test_layout_refusals_are_located(src, at, words):
    d = first_error(src, SPEC)
    assert (d.span.line, d.span.column) == (1, src.index(at) + 1)
    assert words in d.message


def test_zoo_on_llava_next_7b_compiles_or_is_refused_with_a_reason():
    spec = get_spec("llava-next-7b")
    model = spec.build(device="meta")
    refused = {}
    for path in ZOO:
        try:
            plan = check(path, spec)
        except PolicyError as err:
            refused[path.stem] = err.diagnostics[0]
            continue
        # installs on the full-size module tree (recoverable.vt's clip_text with a tiny
        # text encoder whose visual projection reads this ViT's width)
        with vc.apply(plan, model, **text_encoder_kwargs(path, width=spec.vit.hidden)):
            assert vc.image_token_count(model) == plan.image_placeholders
        # vit.out counts are per crop: the LLM receives five crops' worth
        if any(s.site.tower == "vit" for s in plan.stages):
            assert plan.image_placeholders == plan.projector_tokens and plan.projector_tokens % 5 == 0
        else:
            assert plan.image_placeholders == 2928
    # both read a ViT score at an LLM stage, which has no meaning once crops are packed
    assert set(refused) == {"todre", "vflowopt"}
    for name in refused:
        assert refused[name].code == "model-layout" and "packed LLM tokens" in refused[name].message


# ---------------------------------------------------------------------------- other image sizes
SMALL = (45, 60)  # a 3:4 image: anyres picks 1x2 crops and unpads the map to 4 x 6


def small_inputs():
    return SPEC.for_image(*SMALL), anyres_inputs(SPEC, SMALL, 1, seed=4)


def packed_crop_ids(model, size, crops: int) -> torch.Tensor:
    """The crop of every packed visual token, by transformers' own packing of features
    that carry their crop number (newline tokens: -1, then their row's last crop)."""
    feats = torch.arange(crops, dtype=torch.float32)[:, None, None].expand(crops, BASE, 1)
    packed, _ = type(model.model).pack_image_features(
        model.model, [feats], torch.tensor([list(size)]), "default", image_newline=torch.full((1,), -1.0))
    ids = packed[0][:, 0].long()
    for i in range(1, ids.numel()):
        if ids[i] < 0:
            ids[i] = ids[i - 1]
    return ids


def test_counts_at_other_sizes_equal_transformers(models):
    model = models["eager"]
    for size in [(112, 112), (56, 112), (45, 60), (60, 45)]:
        spec = SPEC.for_image(*size)
        px = torch.randn(1, spec.vit_crops, 3, CROP, CROP)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=px, image_sizes=torch.tensor([list(size)])).pooler_output
        assert feats[0].shape[0] == spec.image_tokens, size


def test_llm_stage_at_another_image_size_resolves_for_its_count(models):
    """`top 50%` of a 44-token image keeps 22, and `per crop` reads the unpadded layout."""
    model = models["eager"]
    spec, batch_inputs = small_inputs()
    assert (spec.vit_crops, spec.image_tokens) == (3, 44)
    ref = fresh_copy(model)
    att = last_query_attention(ref, batch_inputs, layer=0)
    rows = (batch_inputs["input_ids"][0] == IMG).nonzero().flatten()
    crop = packed_crop_ids(model, SMALL, 3)
    chosen = torch.cat([top_rows(att[0], rows[crop == c], k) for c, k in zip(range(3), (8, 7, 7))]).sort().values
    want = masked_generate(ref, batch_inputs, [rows[~torch.isin(rows, chosen)]], from_layer=1, new_tokens=5)
    with vc.apply("at llm.layer1 keep text top 50% per crop", model):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=5, do_sample=False)
        assert vc.kept_counts(model)["llm"]["llm.layer1#0"] == (44, 22)
        assert torch.equal(vc.kept_tokens(model)["llm.layer1#0"][0], chosen)
    assert torch.equal(got, want)


def test_vit_stage_at_another_image_size_packs_its_crops(models):
    model = models["eager"]
    spec, batch_inputs = small_inputs()
    want = clip_crop_features(model, batch_inputs["pixel_values"], prune_at=2, keep=8)  # 3 crops x 8
    with vc.apply("at vit.layer2 keep cls top 8", model):
        with torch.no_grad():
            gen = model.generate(**batch_inputs, max_new_tokens=5, do_sample=False)
    ref = fresh_copy(model)
    short = vc.rewrite_inputs(batch_inputs["input_ids"], image_token_id=IMG, from_count=44, to_count=24)
    embeds = ref.get_input_embeddings()(short["input_ids"]).clone()
    embeds[0, short["input_ids"][0] == IMG] = want[0]
    with torch.no_grad():
        new = ref.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen[:, :-5], batch_inputs["input_ids"])  # the caller's prompt comes back (44 per image)
    assert torch.equal(gen[:, -5:], new[:, -5:])


def test_images_of_two_sizes_in_one_call_are_refused(models):
    model = models["eager"]
    batch_inputs = inputs(2)
    batch_inputs["image_sizes"] = torch.tensor([[112, 112], [56, 112]])
    with vc.apply("at llm.layer2 keep text top 50%", model), pytest.raises(vc.CompileError, match="one token layout"):
        model(**batch_inputs)
    # sizes with the same crops and unpadding share a layout (and one plan): accepted
    batch_inputs["image_sizes"] = torch.tensor([[112, 112], [80, 81]])
    assert SPEC.for_image(80, 81).crop_map == SPEC.for_image(112, 112).crop_map
    with vc.apply("at llm.layer2 keep text top 50%", model), torch.no_grad():
        model(**batch_inputs)
        assert vc.kept_counts(model)["llm"]["llm.layer2#0"] == (N_IMG, N_IMG // 2)


def test_cli_check_counts_at_the_image_size_given():
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    run = CliRunner().invoke(main, ["check", "policies/visionzip.vt", "-m", "llava-next-7b", "--image", "600x800",
                                    "--json"])
    assert run.exit_code == 0, run.output
    data = json.loads(run.stdout)
    # 600x800 -> 2x2 crops (5 x 192 kept at vit.out); unpadded, the unpruned image has
    # 576 + 36 rows x (48 + newline) tokens
    assert data["visual_tokens_to_llm"] == 5 * 192
    assert data["flops"]["baseline"] == estimate_counts(get_spec("llava-next-7b"), [577] * 24, 2880,
                                                        [576 + 36 * 49] * 32, 64).policy.flops
    bad = CliRunner().invoke(main, ["check", "policies/visionzip.vt", "-m", "llava-next-7b", "--image", "600by800"])
    assert bad.exit_code == 2 and "HEIGHTxWIDTH" in bad.output


def test_patch_processor_refuses_a_size_dependent_count(models):
    class Processor:  # the one knob LlavaProcessor has
        num_additional_image_tokens = 1

    model = models["eager"]
    with vc.apply("at vit.layer2 keep cls top 8", model), pytest.raises(TypeError, match="depends on each image"):
        vc.patch_processor(Processor(), model)


def test_pruned_crops_are_read_as_concatenated_even_when_the_total_matches_the_intact_count(models):
    """57x70 picks 5 crops and unpads to 70 tokens; 5 crops x 14 kept is 70 too, but those
    tokens are concatenated crops: `per crop` must give each crop its 2."""
    model = models["eager"]
    spec = SPEC.for_image(57, 70)
    assert spec.image_tokens == 5 * 14
    ids = torch.tensor([[1, 17, 42] + [IMG] * spec.image_tokens + [23, 5]])
    px = torch.randn(1, 5, 3, CROP, CROP, generator=torch.Generator().manual_seed(0))
    with vc.apply("at vit.out keep cls top 14; at llm.layer1 keep text top 10 per crop", model), torch.no_grad():
        model(input_ids=ids, pixel_values=px, image_sizes=torch.tensor([[57, 70]]))
        kept = vc.kept_tokens(model)["llm.layer1#1"][0] - 3  # index among the visual tokens
    assert torch.bincount(kept // 14, minlength=5).tolist() == [2] * 5


def test_llm_layer0_without_an_attention_mask_is_one_sequence(models):
    """Gathered position ids have gaps; without a mask transformers would read them as
    packed sequences. No mask must mean the same as an all-ones mask."""
    model = models["eager"]
    batch_inputs = inputs(1)
    with vc.apply("at llm.layer0 keep uniform 20", model), torch.no_grad():
        masked = model(**batch_inputs, use_cache=False).logits
        bare = model(**{k: v for k, v in batch_inputs.items() if k != "attention_mask"}, use_cache=False).logits
    assert torch.equal(masked, bare)
