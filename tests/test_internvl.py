"""InternVL3 (issue 19 item 3): the specs from the published config, tile counts against
transformers' own InternVL image processor, the cost model against FlopCounterMode part by
part, compiled LLM stages against a masked reference, and the ViT sites. Expected numbers
are computed here from the architecture or the processor, not read from vtdsl."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate_counts
from vtdsl.ir import check
from vtdsl.models import get_spec, list_specs
from vtdsl.models.builtins import builtin_config_dict
from vtdsl.models.registry import spec_from_config

from family_runs import (assert_flops_equal_the_cost_model, assert_grouped_fastv_matches, check_image_counts,
                         assert_layer0_uniform_keeps_positions, generate_on_fewer_placeholders)
from plain_refs import first_error, plain_copy, sharpened_pair

SPEC = get_spec("tiny-internvl3")
IMG, PAD, START, END, PER_TILE = 250, 2, 3, 4, 16  # 64-pixel tiles of 8x8 patches, shuffled 2x2
SIZE, TILES = (64, 128), 3  # a 64x128 image: 1x2 tiles and the thumbnail


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def inputs(batch: int, seed: int = 5) -> dict:
    """One 64x128 image per prompt as InternVL's processor lays it out: `<img>` (3), every
    tile's tokens back to back, `</img>` (4); the tiles of all prompts stacked in
    `pixel_values` ([B·tiles, 3, 64, 64]); batch 2 is left-padded."""
    def prompt(text):
        return text[:2] + [START] + [IMG] * (TILES * PER_TILE) + [END] + text[2:]

    rows = [torch.tensor(prompt([5, 6, 8, 9, 10]))]
    if batch == 2:
        rows.append(torch.tensor(prompt([11, 12, 13, 14, 15, 16, 17])))
    ids = pad_sequence(rows, batch_first=True, padding_value=PAD, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    px = torch.randn(len(rows) * TILES, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px)


# ---------------------------------------------------------------------------- spec
def _internvl3_8b_params() -> int:
    """InternVL3-8B's parameters from its architecture: InternViT-300M (patch conv with
    bias, CLS, learned positions for 32x32 patches + CLS, q/k/v/projection with biases,
    two LayerNorms and two layer-scale vectors per block, no final norm under mean
    pooling), the LayerNorm + 2-linear projector, Qwen2.5-7B (q/k/v biases, GQA 28/4,
    untied head)."""
    d, ffn, n = 1024, 4096, 32 * 32 + 1
    block = 2 * 2 * d + 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d)
    vision = (3 * 14 * 14 * d + d) + d + n * d + 24 * block
    h, mlp, vocab, kv = 3584, 18944, 151674, 4 * 128
    projector = 2 * 4 * d + (4 * d * h + h) + (h * h + h)
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp + 2 * h
    return vision + projector + vocab * h + 28 * layer + h + h * vocab


def test_spec_from_the_published_config():
    s = get_spec("internvl3-8b")
    assert get_spec("OpenGVLab/InternVL3-8B-hf") is s
    assert (s.family, s.model_class, s.has_cls, s.spatial_merge, s.tile_range, s.select_strategy) == (
        "internvl", "InternVLForConditionalGeneration", True, 2, (1, 12), "default")
    assert (s.vit.layers, s.vit.hidden, s.vit.ffn, s.vit.heads, s.vit.mlp) == (24, 1024, 4096, 16, "gelu")
    assert (s.llm.layers, s.llm.hidden, s.llm.heads, s.llm.kv_heads, s.llm.ffn) == (28, 3584, 28, 4, 18944)
    # one 448-pixel tile: CLS + 32x32 patches in the tower, 16x16 shuffled tokens of 4 patches
    assert (s.vit_tokens, s.image_tokens, s.llm_grid, s.projector, s.image_token_id) == (
        1025, 256, (16, 16), (4096, 3584, 3584), 151667)
    assert s.param_count() == _internvl3_8b_params() == 7_944_373_760  # the hub's 7.94 B
    assert family_of(s).name == "internvl" and not family_of(s).sized_per_image
    assert (SPEC.image_tokens, SPEC.vit_tokens, SPEC.for_image(*SIZE).image_tokens) == (
        PER_TILE, 65, TILES * PER_TILE)


def test_vtdsl_models_lists_both():
    from click.testing import CliRunner

    from vtdsl.cli import main

    assert {"internvl3-8b", "tiny-internvl3"} <= {spec.name for spec in list_specs()}
    run = CliRunner().invoke(main, ["models"])
    assert run.exit_code == 0 and "internvl3-8b" in run.output and "tiny-internvl3" in run.output


# hand-worked with the processor's rule (closest ratio; on a tie the larger grid while the
# image covers more than half of it): (height, width) -> tiles the tower encodes
HAND = {(448, 448): 1,  # 1x1: no thumbnail
        (448, 896): 3,  # 2 wide (4x2 ties, but the image covers only a quarter of it) + thumbnail
        (896, 896): 5,  # 1x1, 2x2, 3x3 tie; 2x2 is covered more than half, 3x3 is not
        (1000, 700): 7,  # ratio 0.7: 2 wide x 3 high (0.667) + thumbnail
        (100, 4000): 13}  # ratio 40: 12 wide x 1 high, the closest of all + thumbnail

SIZES = [(100, 100), (448, 448), (449, 300), (1000, 700), (333, 2000), (2000, 333), (5000, 40), (64, 64),
         (64, 128), (896, 896), (448, 896), (1344, 896), (720, 1280), (1080, 1920), (3000, 3000), (50, 60)]


@pytest.mark.parametrize("name", ["internvl3-8b", "tiny-internvl3"])
def test_tiles_for_image_sizes_equal_the_image_processor(name):
    """The tiles transformers' InternVL image processor (GotOcr2, PIL backend, with the
    processor's `crop_to_patches` on) cuts from an image, counted both by its
    `get_number_of_image_patches` and by the tiles its preprocessing returns; the
    placeholders are 256 (16 on the tiny model) per tile, as InternVLProcessor writes them."""
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    config = builtin_config_dict(name)
    pre = config["vtdsl_preprocessor"]
    spec = spec_from_config(config, name=name)
    processor = GotOcr2ImageProcessorPil(**pre)
    seq = config["image_seq_length"]
    for height, width in SIZES:
        sized = spec.for_image(height, width)
        tiles = processor.get_number_of_image_patches(height, width, {})
        assert sized.vit_crops == tiles, (name, height, width)
        assert sized.image_tokens == seq * tiles
        if max(height, width) <= 2000:  # the pixels themselves, where cheap
            out = processor(images=[Image.fromarray(np.full((height, width, 3), 7, np.uint8))], return_tensors="np")
            assert out["num_patches"][0] == tiles == out["pixel_values"].shape[0]
    if name == "internvl3-8b":
        assert {size: spec.for_image(*size).vit_crops for size in HAND} == HAND


def test_one_tile_when_the_processor_cuts_none():
    config = builtin_config_dict("internvl3-8b")
    config["vtdsl_preprocessor"] = {**config["vtdsl_preprocessor"], "max_patches": 1}
    spec = spec_from_config(config, name="one-tile")
    assert spec.tile_range == (1, 1) and spec.for_image(3000, 1000).image_tokens == 256


def test_check_cli_counts_an_image(tmp_path):
    """`vtdsl check --image`: a 1000x700 image is 3x2 tiles and the thumbnail, 7 x 256."""
    assert check_image_counts(tmp_path, "internvl3-8b", "1000x700") == (1792, 7, 896)


# ---------------------------------------------------------------------------- cost
def test_cost_of_internvl3_8b_equals_flop_counter_on_meta_part_by_part():
    """A 896x896 image (2x2 tiles + the thumbnail, 5 x 256 tokens) and 64 text tokens, each
    part of the meta model counted by FlopCounterMode (the tower on the tiles, the
    projector on the shuffled features, the LLM, the head on the last row), against the
    architecture's FLOPs by hand."""
    spec = get_spec("internvl3-8b").for_image(896, 896)
    model = spec.build(device="meta", attn_implementation="eager")
    text, tiles, n, d, ffn = 64, 5, 1025, 1024, 4096
    h, mlp, kv = 3584, 18944, 512

    def counted(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = fn()
        return counter.get_total_flops(), out

    px = torch.zeros(tiles, 3, 448, 448, device="meta", dtype=model.dtype)
    vit, _ = counted(lambda: model.model.vision_tower(pixel_values=px).last_hidden_state)
    shuffled = torch.zeros(tiles, 256, 4 * d, device="meta", dtype=model.dtype)
    projector, _ = counted(lambda: model.model.multi_modal_projector(shuffled))
    big_n = tiles * 256 + text
    embeds = torch.zeros(1, big_n, h, device="meta", dtype=model.dtype)
    llm, states = counted(lambda: model.model.language_model(inputs_embeds=embeds).last_hidden_state)
    head, _ = counted(lambda: model.lm_head(states[:, -1:]))

    block = 2 * n * (4 * d * d + 2 * d * ffn) + 4 * d * n * n
    want = {"vit": tiles * (24 * block + 2 * 1024 * 3 * 14 * 14 * d),
            "projector": 2 * tiles * 256 * (4 * d * h + h * h),
            "llm": 28 * (2 * big_n * (2 * h * h + 2 * h * kv + 3 * h * mlp) + 4 * h * big_n**2),
            "lm_head": 2 * h * 151674}
    cost = estimate_counts(spec, [n] * 24, tiles * 256, [tiles * 256] * 28, text).baseline
    assert dict(vit=vit, projector=projector, llm=llm, lm_head=head) == want == {p: getattr(cost, p) for p in want}


# LLM stages, vit.out stages (select, diverse + merge by keys) and both
COMPILED = ["at llm.layer2 keep text top 50%", "at llm.layer0 keep uniform 20; at llm.layer2 keep text top 5",
            "at vit.out keep cls@vit.layer3 top 6",
            "at vit.out keep cls@vit.layer2 top 4 + diverse 2 then merge rest into 2 by keys",
            "at vit.out keep cls@vit.layer3 top 6; at llm.layer2 keep text top 50%"]


@pytest.mark.parametrize("src", COMPILED)
def test_compiled_flops_equal_the_cost_model(models, src):
    """On the spec sized for the call's 64x128 image (its three tiles counted together;
    `<img>` and `</img>` are text). A vit.out stage works per tile on the shuffled tokens,
    4 patches wide (diverse's cosines, the merge's)."""
    assert_flops_equal_the_cost_model(models["eager"], SPEC.for_image(*SIZE), src, inputs(1), IMG)


# ---------------------------------------------------------------------------- LLM stages
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sized", [False, True])
def test_llm_stage_generate_matches_masked_reference(models, attn, sized):
    """Batch 2, left-padded. On the per-tile spec `top 50%` keeps 8 of each tile's 16; on
    the spec sized for the 64x128 image, 24 of its 48 (all tiles together)."""
    model = models[attn]
    assert_grouped_fastv_matches(model, plain_copy(SPEC, model), SPEC.for_image(*SIZE) if sized else SPEC, inputs(2),
                                 IMG, group=TILES * PER_TILE if sized else PER_TILE)


def test_llm_layer0_keeps_positions(models):
    """Tokens dropped before the LLM leave the kept ones (and `</img>` and the text after
    it) their positions: the same as masking the dropped rows everywhere."""
    model = models["sdpa"]
    assert_layer0_uniform_keeps_positions(model, plain_copy(SPEC, model, "sdpa"), inputs(2), IMG, PER_TILE)


# ---------------------------------------------------------------------------- ViT stages
def _plain_tile_scores(model, px: torch.Tensor, layer: int) -> torch.Tensor:
    """`cls@vit.layer{layer}` by hand, per tile: the plain tower's layers run one by one,
    layer `layer`'s CLS query row against every key (pre-norm input, its own q/k
    projections, softmax over all tokens, head mean), read at the patch columns and summed
    over each 2x2 group of patches, in raster order on the tile's 4x4 shuffled grid
    ``[tiles, 16]``."""
    tower = model.model.vision_tower
    with torch.no_grad():
        h = tower.embeddings(px)
        for block in tower.encoder.layer[:layer]:
            h = block(h)
        block = tower.encoder.layer[layer]
        x = block.layernorm_before(h)
        heads = tower.config.num_attention_heads
        q = block.attention.q_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = block.attention.k_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        probs = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)[:, 0, 1:]
    side = SPEC.image_size // SPEC.patch_size
    return probs.reshape(-1, side // 2, 2, side // 2, 2).sum((2, 4)).reshape(-1, (side // 2) ** 2)


def _plain_features(model, px: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The plain model's image features of the kept shuffled tokens: the tower's last
    layer, CLS dropped, the model's own pixel shuffle, the kept rows, the projector."""
    with torch.no_grad():
        feats = model.model.vision_tower(pixel_values=px).last_hidden_state[:, 1:]
        side = int(feats.shape[1] ** 0.5)
        shuffled = model.model.pixel_shuffle(feats.reshape(feats.shape[0], side, side, -1), scale_factor=0.5)
        shuffled = shuffled.reshape(feats.shape[0], -1, shuffled.shape[-1])
        return model.model.multi_modal_projector(shuffled.gather(1, kept[..., None].expand(-1, -1,
                                                                                           shuffled.shape[-1])))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sized", [False, True])
def test_vit_out_stage_equals_a_plain_loop_per_tile(models, attn, sized):
    """`at vit.out keep cls@vit.layer3 top 6` keeps, in every tile (the thumbnail too),
    the 6 shuffled tokens whose 2x2 groups the CLS attends to most; the LLM then sees the
    kept tokens tile by tile. Batch 2, left-padded: greedy tokens equal the plain model
    fed those features in a prompt with 6 placeholders per tile."""
    model, keep = models[attn], 6
    batch_inputs = inputs(2)
    ref = plain_copy(SPEC, model, attn)
    px = batch_inputs["pixel_values"]
    scores = _plain_tile_scores(ref, px, layer=3)
    order = scores.argsort(dim=1, descending=True)
    gaps = scores.gather(1, order[:, keep - 1:keep]) - scores.gather(1, order[:, keep:keep + 1])
    assert bool((gaps > 1e-6).all()), "near-tied scores: the reference would be ambiguous"
    kept = order[:, :keep].sort(dim=1).values
    features = _plain_features(ref, px, kept).reshape(2, TILES * keep, -1)
    want = generate_on_fewer_placeholders(ref, batch_inputs, IMG, features, new_tokens=5)
    spec = SPEC.for_image(*SIZE) if sized else SPEC
    with vc.apply(f"at vit.out keep cls@vit.layer3 top {keep}", model, spec=spec):
        assert vc.image_token_count(model) == keep * (TILES if sized else 1)
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["vit.out#0"], kept + 1)  # vids count from 1
    assert torch.equal(got[:, -5:], want)


def test_vit_sites_and_cls_token_are_refused_where_they_point():
    cases = {"at vit.out keep cls_token + cls top 10": ("cls_token", "cls-token", "never reaches it"),
             "at llm.layer2 keep cls@vit.layer3 top 10": ("cls@", "model-layout", "summed over each shuffled"),
             "at vit.out pool 8x8": ("pool", "pool", "")}
    for src, (at, code, words) in list(cases.items())[:2]:
        d = first_error(src, SPEC)
        assert (d.span.line, d.span.column, d.code, words in d.message) == (1, src.index(at) + 1, code, True), src
    # a token at vit.out is one shuffled group: the tile's grid is 4x4; a stage inside the
    # tower keeps whole groups (tests/test_vit_groups.py), counted alike
    assert check("at vit.out keep cls@vit.layer3 top 50%", SPEC).stages[0].tokens_in == PER_TILE
    assert check("at vit.layer2 keep cls@vit.layer1 top 10", SPEC).stages[0].tokens_in == PER_TILE
    assert check("at vit.out pool 2x2", SPEC).stages[0].tokens_out == PER_TILE // 4


# ---------------------------------------------------------------------------- model directories
def _hub_directory(tmp_path, pre: dict | None = None, top: dict | None = None, **vision) -> str:
    """OpenGVLab/InternVL3-8B-hf's file layout: sides as [height, width] pairs, the text
    config's flat `rope_theta` and its `rope_scaling`, and a preprocessor_config.json that
    leaves `crop_to_patches` off (InternVLProcessor turns it on for every call)."""
    import json

    config = builtin_config_dict("internvl3-8b")
    config.pop("vtdsl_preprocessor")
    config.update(top or {})
    config["vision_config"].update({"image_size": [448, 448], "patch_size": [14, 14], **vision})
    text = config["text_config"]
    text.pop("rope_parameters")
    text.update(rope_theta=1000000.0, rope_scaling={"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "GotOcr2ImageProcessorFast", "crop_to_patches": False, "min_patches": 1,
         "max_patches": 12, "size": {"height": 448, "width": 448}, **(pre or {})}))
    return str(tmp_path)


def test_a_hub_style_directory_gives_the_registered_spec(tmp_path):
    local, builtin = get_spec(_hub_directory(tmp_path)), get_spec("internvl3-8b")
    fields = ("family", "vit", "llm", "projector", "vocab_size", "image_token_id", "dtype", "image_tokens",
              "spatial_merge", "tile_range", "merged_features", "has_cls", "image_size", "patch_size")
    assert [getattr(local, f) for f in fields] == [getattr(builtin, f) for f in fields]
    assert local.for_image(1000, 700).image_tokens == 7 * 256
    assert local.param_count() == builtin.param_count()


def test_a_non_square_tower_is_refused_naming_the_key(tmp_path):
    from vtdsl.lang.errors import PolicyError

    with pytest.raises(PolicyError, match=r"(?s)vision_config.image_size \[448, 336\].*expected: a square \[n, n\]"):
        get_spec(_hub_directory(tmp_path, image_size=[448, 336]))
    with pytest.raises(PolicyError, match=r"vision_config.patch_size: expected \[height, width\]"):
        get_spec(_hub_directory(tmp_path, patch_size=[14, 14, 14]))


def test_vit_out_gnorm_sums_the_groups_of_a_plain_loop(models):
    """`gnorm@vit.layer2` by hand per tile: layer 2's output through layer 3's input norm
    (InternViT's `layernorm_before`), each patch's L2 norm summed over its 2x2 group; the
    stage keeps the 6 largest groups of every tile. The norm's weight is drawn at random
    for the test: with the initial ones every normed patch has the same norm, sqrt(width),
    and the groups tie."""
    model, keep = models["eager"], 6
    batch_inputs = inputs(2)
    tower = model.model.vision_tower
    norm = tower.encoder.layer[3].layernorm_before
    initial = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.mul_(0.2 + 2 * torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(1)))
            h = tower.embeddings(batch_inputs["pixel_values"])
            for block in tower.encoder.layer[:3]:
                h = block(h)
            norms = norm(h)[:, 1:].norm(dim=-1)
        side = SPEC.image_size // SPEC.patch_size
        groups = norms.reshape(-1, side // 2, 2, side // 2, 2).sum((2, 4)).reshape(norms.shape[0], -1)
        ranked = groups.sort(dim=1, descending=True).values
        assert bool((ranked[:, keep - 1] - ranked[:, keep] > 1e-4).all()), "near-tied groups"
        want = groups.argsort(dim=1, descending=True)[:, :keep].sort(dim=1).values + 1
        with vc.apply(f"at vit.out keep gnorm@vit.layer2 top {keep}", model), torch.no_grad():
            model(**batch_inputs)
            assert torch.equal(vc.kept_tokens(model)["vit.out#0"], want)
    finally:
        with torch.no_grad():
            norm.weight.copy_(initial)


def test_the_tower_is_traced_once_per_encoder(models):
    """Compiling again onto the same InternViT encoder reuses its traced layer loop (the
    trace is most of a ViT-stage compile) and lists the same fx code."""
    from unittest import mock

    import vtdsl.compiler.vit as vit

    model, codes = models["sdpa"], []
    vit._TRACED.pop(model.model.vision_tower.encoder, None)
    with mock.patch.object(vit, "_trace_layer_loop", wraps=vit._trace_layer_loop) as trace:
        for src in ("at vit.out keep cls@vit.layer3 top 6", "at vit.out keep attn@vit.layer2 top 4"):
            with vc.apply(src, model):
                codes.append(vc.compiled(model).listing.fx_code["model.vision_tower.encoder"])
    assert trace.call_count == 1 and codes[0] == codes[1]



@pytest.mark.parametrize("pre, top, words", [
    ({}, {"downsample_ratio": 0.3}, "downsample_ratio 0.3\n  expected: 1 / n for a whole n"),
    ({"min_patches": 5, "max_patches": 2}, {}, "min_patches 5 / max_patches 2\n  expected: integers 1 <="),
    ({"size": {"height": 224, "width": 224}}, {}, "tile size 224x224\n  expected: the vision tower's 448x448"),
])
def test_layouts_vtdsl_cannot_count_are_refused_in_one_located_line(tmp_path, pre, top, words):
    """`vtdsl check --model DIR`: exit 2 and the file, the problem and what was expected."""
    from click.testing import CliRunner

    from vtdsl.cli import main

    from pathlib import Path

    policy = str(Path(__file__).resolve().parent.parent / "policies" / "fastv.vt")
    run = CliRunner().invoke(main, ["check", policy, "--model", _hub_directory(tmp_path, pre, top)])
    assert run.exit_code == 2 and "config.json: error: " in run.output and words in run.output, run.output
    assert "Traceback" not in run.output
