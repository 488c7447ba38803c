"""LLaVA-OneVision (issue 19 item 5): the spec from the published config, token counts
against transformers' own processor and packing (anyres crops, unpadding, the anyres_max
shrink, newline tokens), the cost model against FlopCounterMode part by part, compiled
LLM stages against a masked reference and ViT stages against a plain loop over the SigLIP
layers. Expected numbers are computed here from the architecture, not read from vtdsl."""

from __future__ import annotations

import types
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate, estimate_counts
from vtdsl.ir import check
from vtdsl.models import get_spec, list_specs

from family_runs import (anyres_inputs, assert_fastv_matches_masked_reference, compiled_anyres_vit_run,
                         compiled_generate, compiled_prefill_flops, generate_on_fewer_placeholders)
from plain_refs import (plain_copy, first_error, flops_per_part, last_query_attention, masked_generate, sharpened_pair,
                        top_rows)

SPEC = get_spec("tiny-llava-onevision")
BIG = "llava-onevision-qwen2-7b"
IMG = SPEC.image_token_id
CROP = 56  # pixels per crop: 4x4 patches of 14
SIDE = 4
BASE = SIDE * SIDE
# 168x168 picks 3x3 crops: a 12x12 map, shrunk under anyres_max_4 (ratio sqrt(144 / 64) =
# 1.5) to 8x8, each row ended by a newline token
N_IMG = BASE + 8 * (8 + 1)  # 88
SIZES = [(2304, 2304), (384, 384), (600, 800), (1080, 1920), (336, 5000), (5000, 300), (767, 1535), (1000, 1000),
         (480, 640), (1536, 384)]


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def fresh_copy(model, attn="eager"):
    return plain_copy(SPEC, model, attn)


def inputs(batch: int, size=(3 * CROP, 3 * CROP), seed: int = 3):
    """One image of `size` per prompt; batch 2 is left-padded."""
    return anyres_inputs(SPEC, size, batch, seed)


# ---------------------------------------------------------------------------- spec and counts
def _onevision_7b_params() -> int:
    """The 7B's parameters from its architecture: SigLIP (biases everywhere, 729 learned
    positions, no pooling head), the projector, the newline vector, Qwen2-7B (q/k/v
    biases) with an untied head."""
    d, ffn, h, kv, mlp, vocab = 1152, 4304, 3584, 512, 18944, 152128
    embed = 3 * 14 * 14 * d + d + 729 * d
    block = 2 * 2 * d + 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d)
    vit = embed + 26 * block + 2 * d
    projector = (d * h + h) + (h * h + h)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp + 2 * h
    return vit + projector + h + vocab * h + 28 * layer + h + vocab * h


def test_spec_from_the_published_config():
    s = get_spec(BIG)
    assert get_spec("llava-hf/llava-onevision-qwen2-7b-ov-hf") is s
    assert (s.family, s.has_cls, s.select_strategy, s.vision_feature_layer) == ("llava-onevision", False, "full", -1)
    assert (s.vit.layers, s.vit.hidden, s.vit.ffn, s.vit.heads, s.vit.mlp) == (26, 1152, 4304, 16, "gelu")
    assert (s.llm.layers, s.llm.hidden, s.llm.heads, s.llm.kv_heads, s.llm.ffn) == (28, 3584, 28, 4, 18944)
    assert (s.vit_tokens, s.vit_crops, s.anyres_grid, s.anyres_max_crops) == (729, 37, (6, 6), 9)
    # 2304x2304: a 162x162 map, ratio sqrt(162^2 / (9 * 729)) = 2 -> 81x81, plus newlines
    assert (s.projector_tokens, s.image_tokens) == (37 * 729, 729 + 81 * 82)
    assert s.param_count() == _onevision_7b_params()
    assert family_of(s).name == "llava-onevision" and family_of(SPEC).sized_per_image
    assert (SPEC.vit_crops, SPEC.image_tokens) == (10, N_IMG)


def test_vtdsl_models_lists_both():
    from click.testing import CliRunner

    from vtdsl.cli import main

    assert {BIG, "tiny-llava-onevision"} <= {spec.name for spec in list_specs()}
    run = CliRunner().invoke(main, ["models"])
    assert run.exit_code == 0 and BIG in run.output and "tiny-llava-onevision" in run.output


def test_counts_equal_the_processor_over_image_sizes():
    """transformers' LlavaOnevisionProcessor count (its `_get_number_of_features`, on a
    stand-in object: the processor itself cannot be built here, its argument check looks up
    the video processor, which needs torchvision) and the image processor's crops."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    spec = get_spec(BIG)
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    images = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=pinpoints)
    proc = types.SimpleNamespace(image_processor=images, num_image_tokens=729, vision_aspect_ratio="anyres_max_9")
    proc._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, proc)
    for height, width in SIZES:
        sized = spec.for_image(height, width)
        assert sized.image_tokens == LlavaOnevisionProcessor._get_number_of_features(proc, height, width, 384, 384)
        crops = images(np.zeros((height, width, 3), dtype=np.uint8), return_tensors="pt")["pixel_values"].shape[1]
        assert sized.vit_crops == crops, (height, width)


def test_counts_equal_the_models_own_packing():
    """The tiny model's `get_image_features` at sizes that unpad, shrink, or neither."""
    model = SPEC.build(device="cpu", seed=0)
    for size in [(168, 168), (56, 56), (45, 60), (60, 45), (100, 170), (170, 40), (1000, 3000)]:
        spec = SPEC.for_image(*size)
        px = torch.randn(1, spec.vit_crops, 3, CROP, CROP)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=px,
                                                   image_sizes=torch.tensor([list(size)])).pooler_output
        assert feats[0].shape[0] == spec.image_tokens, size
    assert SPEC.for_image(100, 170).crop_map[:2] == (6, 9)  # 8x12 unpadded, shrunk by sqrt(96 / 64)


def meta_7b_parts(**call) -> tuple[dict, int]:
    """FlopCounterMode of one prefill of the meta LLaVA-OneVision 7B on `call` (last logits
    only) by part, and its total."""
    model = get_spec(BIG).build(device="meta", attn_implementation="eager")
    call = {k: v.to(device="meta", dtype=model.dtype if v.is_floating_point() else v.dtype) if k != "image_sizes"
            else v for k, v in call.items()}
    check_off = mock.patch("transformers.models.llava_onevision.modeling_llava_onevision.torch_compilable_check",
                           lambda *a, **k: None, create=True)
    with check_off, torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**call, logits_to_keep=1)
    return flops_per_part(model, counter), counter.get_total_flops()


def onevision_7b_parts(crops: int, n_llm: int) -> dict:
    """The 7B's FLOPs by hand: SigLIP (1152 wide, MLP 4304, 26 layers) on each crop's 729
    patches, the projector (1152 -> 3584 -> 3584) on them, 28 Qwen2-7B layers (4 KV heads of
    128, SwiGLU 18944) on `n_llm` tokens, the last row's logits (152128)."""
    d, ffn, h, kv, mlp, n_vit = 1152, 4304, 3584, 512, 18944, 729
    vit_layer = 2 * n_vit * (4 * d * d + 2 * d * ffn) + 4 * n_vit * n_vit * d
    llm_layer = 2 * n_llm * (2 * h * h + 2 * h * kv + 3 * h * mlp) + 4 * n_llm * n_llm * h
    return {"vit": crops * (2 * n_vit * 3 * 14 * 14 * d + 26 * vit_layer),
            "projector": 2 * crops * n_vit * (d * h + h * h),
            "llm": 28 * llm_layer,
            "lm_head": 2 * h * 152128}


def test_cost_of_the_7b_equals_flop_counter_on_meta_part_by_part():
    spec = get_spec(BIG)
    text = 64
    ids = torch.cat([torch.full((1, spec.image_tokens), IMG_BIG := spec.image_token_id),
                     torch.ones(1, text, dtype=torch.long)], 1)
    parts, total = meta_7b_parts(input_ids=ids, pixel_values=torch.zeros(1, 37, 3, 384, 384),
                                 image_sizes=torch.tensor([[2304, 2304]]))
    assert IMG_BIG == 151646
    n_vit, crops, n_llm = 729, 37, 729 + 81 * 82 + text
    want = onevision_7b_parts(crops, n_llm)
    assert parts == want and total == sum(want.values())
    report = estimate_counts(spec, [n_vit] * 26, crops * n_vit, [n_llm - text] * 28, text).baseline
    assert {part: getattr(report, part) for part in want} == want


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at vit.layer2 keep knorm@vit.layer1 top 8",
    "at vit.out keep knorm@vit.layer3 top 8; at llm.layer1 keep text top 20 per crop",
    "at vit.out pool 2x2",
    "at llm.layer0 keep diverse 30",
])
def test_compiled_flops_equal_the_cost_model(models, src):
    flops = compiled_prefill_flops(models["eager"], src, inputs(1))
    assert flops == estimate(check(src, SPEC), text_tokens=6, logits="all").flops


# ---------------------------------------------------------------------------- LLM stages
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_llm_stage_generate_matches_masked_reference(models, attn, batch):
    model = models[attn]
    assert_fastv_matches_masked_reference(model, fresh_copy(model), inputs(batch), IMG, N_IMG)


def crop_of_shrunk(i: int) -> int:
    """Crop of the i-th visual token of an intact 168x168 image: the 8x8 map is the 12x12
    one shrunk by 1.5; output row / column j samples source (j + 0.5) * 1.5 - 0.5, nearest
    source 0, 2, 3, 5, 6, 8, 9, 11; 4 source rows per crop (newline: its row's last crop)."""
    if i < BASE:
        return 0
    r, c = divmod(i - BASE, 9)
    source = [0, 2, 3, 5, 6, 8, 9, 11]
    return 1 + (source[r] // SIDE) * 3 + source[min(c, 7)] // SIDE


def test_per_crop_at_an_llm_site_reads_the_shrunk_layout(models):
    model = models["eager"]
    batch_inputs = inputs(2)
    ref = fresh_copy(model)
    att = last_query_attention(ref, batch_inputs, layer=0)
    ids = batch_inputs["input_ids"]
    crop = torch.tensor([crop_of_shrunk(i) for i in range(N_IMG)])
    # source rows and columns per crop: 3, 2, 3; newline tokens go to the right column
    assert torch.bincount(crop).tolist() == [16, 9, 6, 9 + 3, 6, 4, 6 + 2, 9, 6, 9 + 3]
    kept, pruned = [], []
    for b in range(2):
        rows = (ids[b] == IMG).nonzero().flatten()
        chosen = torch.cat([top_rows(att[b], rows[crop == c], 2) for c in range(10)]).sort().values
        kept.append(chosen)
        pruned.append(rows[~torch.isin(rows, chosen)])
    want = masked_generate(ref, batch_inputs, pruned, from_layer=1, new_tokens=5)
    got, kept_got = compiled_generate(model, "at llm.layer1 keep text top 20 per crop", batch_inputs, "llm.layer1#0", 5)
    assert torch.equal(kept_got, torch.stack(kept)) and torch.equal(got, want)


# ---------------------------------------------------------------------------- ViT stages
def crop_features_reference(model, px, prune_at: int, keep: int) -> torch.Tensor:
    """Each crop through the SigLIP layers by hand (no CLS: every token a patch), pruned
    before layer `prune_at` to the `keep` patches with the largest L1 key norm in layer
    `prune_at` - 1; the last layer's output (vision_feature_layer -1, before the tower's
    post-layernorm) through the projector; crops concatenated, base view first."""
    vt = model.model.vision_tower
    layers = vt.encoder.layers
    with torch.no_grad():
        h = vt.embeddings(px.reshape(-1, *px.shape[2:]))
        prev = None
        for i, layer in enumerate(layers):
            if i == prune_at:
                keys = layers[i - 1].self_attn.k_proj(layers[i - 1].layer_norm1(prev))
                idx = keys.abs().sum(-1).topk(keep, dim=1).indices.sort(1).values
                h = torch.stack([h[c, idx[c]] for c in range(h.shape[0])])
            prev = h
            h = layer(h, None)
        out = model.model.multi_modal_projector(h)
    return out.reshape(px.shape[0], -1, out.shape[-1])


def test_vit_stage_prunes_every_crop_and_generate_follows(models):
    model = models["eager"]
    batch_inputs = inputs(2)
    want = crop_features_reference(model, batch_inputs["pixel_values"], prune_at=2, keep=8)
    got, gen = compiled_anyres_vit_run(model, batch_inputs, "at vit.layer2 keep knorm@vit.layer1 top 8", kept=10 * 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen[:, -5:], generate_on_fewer_placeholders(fresh_copy(model), batch_inputs, IMG, want))
    assert torch.equal(gen[:, :-5], batch_inputs["input_ids"])  # the caller's prompt comes back


@pytest.mark.parametrize("src, at, words", [
    ("at vit.layer2 keep cls top 8", "cls", "has no CLS token"),
    ("at llm.layer2 keep cls@vit.layer2 top 20", "cls@", "has no CLS token"),
    ("at vit.out keep cls_token + knorm@vit.layer3 top 8", "cls_token", "has no CLS token"),
    ("at llm.layer2 pool 2x2", "pool", "not one token grid"),
])
def test_refusals_are_located_and_say_why(src, at, words):
    d = first_error(src, SPEC)
    assert (d.span.line, d.span.column) == (1, src.index(at) + 1)
    assert words in d.message


def test_cli_check_counts_at_the_image_size_given(tmp_path):
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    policy = tmp_path / "half.vt"
    policy.write_text("at llm.layer2 keep text top 50%\n", encoding="utf-8")
    run = CliRunner().invoke(main, ["check", str(policy), "-m", BIG, "--image", "600x800", "--json"])
    assert run.exit_code == 0, run.output
    data = json.loads(run.stdout)
    # 600x800 picks 768x1152 (2x3 crops + base): a 54x81 map; the image (4:3) is narrower
    # than the map (3:2): 800 * 54 / 600 = 72 columns are image, (81 - 72) // 2 = 4 cut from
    # each side leaves 54x73, under 9 crops' worth (no shrink); 729 + 54 x (73 + newline)
    assert (data["crops"], data["visual_tokens_to_llm"]) == (7, 729 + 54 * 74)
