"""SmolVLM / Idefics3 (issue 19 item 6): the specs from the published config, token
counts against transformers' own image processor, the cost model against
FlopCounterMode part by part, compiled LLM stages against a masked reference. Expected
numbers are computed here from the architecture, not read from vtdsl."""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

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
                         assert_layer0_uniform_keeps_positions)
from plain_refs import first_error, generate_on_features, plain_copy, sharpened_pair

SPEC = get_spec("tiny-smolvlm")
IMG, PAD, PER_TILE = 250, 2, 16  # 64-pixel tiles of 8x8 patches, pixel shuffle 2
TILES = 5  # a 256x64 image: 4x1 tiles and the global view


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def inputs(batch: int, seed: int = 5) -> dict:
    """One 256x64 image per prompt, as SmolVLM's processor lays it out: each tile's tokens
    after `<fake_token_around_image><row_r_col_1>` (ids 3, 100 + r), a newline (7) after
    each row, then `<fake_token_around_image><global-img>` (3, 99) and the global view's
    tokens; batch 2 is left-padded."""
    def prompt(text):
        tiles = [t for r in range(4) for t in [3, 100 + r] + [IMG] * PER_TILE + [7]]
        return text[:2] + tiles + [3, 99] + [IMG] * PER_TILE + [3] + text[2:]

    rows = [torch.tensor(prompt([5, 6, 8, 9, 10]))]
    if batch == 2:
        rows.append(torch.tensor(prompt([11, 12, 13, 14, 15, 16, 17])))
    ids = pad_sequence(rows, batch_first=True, padding_value=PAD, padding_side="left")
    ones = [torch.ones_like(r) for r in rows]
    mask = pad_sequence(ones, batch_first=True, padding_value=0, padding_side="left")
    px = torch.randn(len(rows), TILES, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px)


def fresh_copy(model, attn="eager"):
    return plain_copy(SPEC, model, attn)


# ---------------------------------------------------------------------------- spec
def _smolvlm_instruct_params() -> int:
    """HuggingFaceTB/SmolVLM-Instruct's parameters from its architecture: SigLIP (biases
    everywhere, learned positions for 27x27 patches), a bias-free connector, SmolLM2-1.7B
    without biases and with an untied head."""
    d, ffn, n = 1152, 4304, 27 * 27
    block = 2 * 2 * d + 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d)
    vision = (3 * 14 * 14 * d + d) + n * d + 27 * block + 2 * d
    h, mlp, vocab = 2048, 8192, 49155
    layer = 4 * h * h + 3 * h * mlp + 2 * h
    return vision + 9 * d * h + vocab * h + 24 * layer + h + h * vocab


def test_spec_from_the_published_config():
    s = get_spec("smolvlm-2.2b")
    assert get_spec("HuggingFaceTB/SmolVLM-Instruct") is s
    assert (s.family, s.model_class, s.has_cls, s.spatial_merge, s.split_edge) == (
        "idefics3", "Idefics3ForConditionalGeneration", False, 3, 1536)
    assert (s.vit.layers, s.vit.hidden, s.vit.ffn, s.vit.heads, s.vit.mlp) == (27, 1152, 4304, 16, "gelu")
    assert (s.llm.layers, s.llm.hidden, s.llm.heads, s.llm.kv_heads, s.llm.ffn) == (24, 2048, 32, 32, 8192)
    # one 384-pixel tile: 27x27 patches, 9x9 tokens of 9 patches each
    assert (s.vit_tokens, s.image_tokens, s.projector, s.image_token_id) == (729, 81, (10368, 2048), 49153)
    assert s.param_count() == _smolvlm_instruct_params() == 2_246_272_880  # the published 2.25 B
    assert family_of(s).name == "idefics3" and not family_of(s).sized_per_image
    assert family_of(get_spec("tiny-smolvlm")).name == "smolvlm"
    tiny = get_spec("tiny-smolvlm")
    assert (tiny.model_class, tiny.image_tokens, tiny.for_image(256, 64).image_tokens) == (
        "SmolVLMForConditionalGeneration", PER_TILE, TILES * PER_TILE)


def test_vtdsl_models_lists_both():
    from click.testing import CliRunner

    from vtdsl.cli import main

    assert {"smolvlm-2.2b", "tiny-smolvlm"} <= {spec.name for spec in list_specs()}
    run = CliRunner().invoke(main, ["models"])
    assert run.exit_code == 0 and "smolvlm-2.2b" in run.output and "tiny-smolvlm" in run.output


SIZES = [(100, 100), (384, 384), (385, 200), (1000, 700), (333, 2000), (2000, 333), (5000, 40), (64, 64),
         (257, 64)]


@pytest.mark.parametrize("name", ["smolvlm-2.2b", "tiny-smolvlm"])
@pytest.mark.parametrize("split", [True, False])
def test_visual_tokens_for_image_sizes_equal_the_processor(name, split):
    """The `<image>` placeholders SmolVLM's processor writes for one image: its image
    processor's tiles (rows, cols) expanded by the processor's prompt function."""
    from PIL import Image
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    config = builtin_config_dict(name)
    pre = {**config.pop("vtdsl_preprocessor"), "do_image_splitting": split}
    spec = spec_from_config({**config, "vtdsl_preprocessor": pre}, name=name)
    processor = SmolVLMImageProcessorPil(**pre)
    per_tile = spec.image_tokens
    for height, width in SIZES:
        image = Image.fromarray(np.full((height, width, 3), 7, np.uint8))
        out = processor(images=[[image]], return_row_col_info=True, return_tensors="np")
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        prompt = get_image_prompt_string(rows, cols, per_tile, "<fake>", "<image>", "<global-img>")
        sized = spec.for_image(height, width)
        assert sized.image_tokens == prompt.count("<image>"), (name, split, height, width)
        assert sized.vit_crops == out["pixel_values"].shape[1]  # the tiles the tower encodes


def test_check_cli_counts_an_image(tmp_path):
    """`vtdsl check --image`: a 1000x700 image is 4x3 tiles and the global view, 13 x 81."""
    assert check_image_counts(tmp_path, "smolvlm-2.2b", "1000x700") == (1053, 13, 527)


# ---------------------------------------------------------------------------- cost
def test_cost_of_smolvlm_2b_equals_flop_counter_on_meta_part_by_part():
    """A 1536x1536 image (4x4 tiles + the global view, 17 x 81 tokens) and 64 text tokens,
    each part of the meta model counted by FlopCounterMode, against the architecture's
    FLOPs by hand. (The whole model cannot run on meta: it drops all-zero tiles by a
    data-dependent test; an all-ones patch mask builds no mask, as on a real device.)"""
    spec = get_spec("smolvlm-2.2b").for_image(1536, 1536)
    model = spec.build(device="meta", attn_implementation="eager")
    text, tiles, n, d, ffn = 64, 17, 729, 1152, 4304

    def counted(fn):
        no_mask = mock.patch("transformers.masking_utils._ignore_bidirectional_mask_sdpa", lambda *a, **k: True)
        with no_mask, torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = fn()
        return counter.get_total_flops(), out

    px = torch.zeros(tiles, 3, 384, 384, device="meta", dtype=model.dtype)
    vit, hidden = counted(lambda: model.model.vision_model(pixel_values=px).last_hidden_state)
    projector, _ = counted(lambda: model.model.connector(hidden))
    embeds = torch.zeros(1, tiles * 81 + text, 2048, device="meta", dtype=model.dtype)
    llm, states = counted(lambda: model.model.text_model(inputs_embeds=embeds).last_hidden_state)
    head, _ = counted(lambda: model.lm_head(states[:, -1:]))

    block = 2 * n * (4 * d * d + 2 * d * ffn) + 4 * d * n * n
    big_n = tiles * 81 + text
    want = {"vit": tiles * (27 * block + 2 * n * 3 * 14 * 14 * d), "projector": 2 * tiles * 81 * 9 * d * 2048,
            "llm": 24 * (2 * big_n * (4 * 2048**2 + 3 * 2048 * 8192) + 4 * 2048 * big_n**2), "lm_head": 2 * 2048 * 49155}
    assert {"vit": vit, "projector": projector, "llm": llm, "lm_head": head} == want
    base = estimate_counts(spec, [n] * 27, tiles * 81, [tiles * 81] * 24, text).baseline
    assert {part: getattr(base, part) for part in want} == want


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at llm.layer0 keep uniform 20; at llm.layer2 keep text top 5",
])
def test_compiled_flops_equal_the_cost_model(models, src):
    """On the spec sized for the call's 256x64 image (its five tiles counted together; the
    row/column and global-view tokens are text)."""
    assert_flops_equal_the_cost_model(models["eager"], SPEC.for_image(256, 64), src, inputs(1), IMG)


# ---------------------------------------------------------------------------- LLM stages
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sized", [False, True])
def test_llm_stage_generate_matches_masked_reference(models, attn, sized):
    """Batch 2, left-padded. On the per-tile spec `top 50%` keeps 8 of each tile's 16; on
    the spec sized for the 256x64 image, 40 of its 80 (all tiles together)."""
    model = models[attn]
    assert_grouped_fastv_matches(model, fresh_copy(model), SPEC.for_image(256, 64) if sized else SPEC, inputs(2), IMG,
                                 group=TILES * PER_TILE if sized else PER_TILE)


def test_per_crop_on_the_sized_spec_is_per_tile(models):
    """On the spec sized for the image, `per crop` splits a count over its five tiles (the
    tokens' crops read from the tiles' order): `top 40 per crop` keeps, and generates,
    what `top 50%` keeps of each tile on the per-tile spec, which the masked reference
    above checks."""
    model = models["eager"]
    batch_inputs = inputs(2)
    kept, runs = {}, {}
    for name, src, spec in [("sized", "at llm.layer2 keep text top 40 per crop", SPEC.for_image(256, 64)),
                            ("tile", "at llm.layer2 keep text top 50%", SPEC)]:
        with vc.apply(src, model, spec=spec), torch.no_grad():
            runs[name] = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)
            kept[name] = vc.kept_tokens(model)["llm.layer2#0"].reshape(2, -1)
    assert kept["sized"].shape == (2, TILES * PER_TILE // 2)
    assert torch.equal(kept["sized"], kept["tile"]) and torch.equal(runs["sized"], runs["tile"])


def test_llm_layer0_keeps_positions_between_the_tiles_text(models):
    """Tokens dropped before the LLM leave the kept ones (and the row/column text tokens
    between tiles) their positions: the same as masking the dropped rows everywhere."""
    model = models["sdpa"]
    assert_layer0_uniform_keeps_positions(model, fresh_copy(model, "sdpa"), inputs(2), IMG, PER_TILE)


# ---------------------------------------------------------------------------- ViT stages
@pytest.fixture(scope="module")
def vit_models():
    """`models` with the tower's attention sharpened too (q projections x 128) and random
    input-norm gains: the random tower attends almost uniformly and its freshly built
    LayerNorms give every patch the same norm, which would leave ranks to rounding."""
    pair = sharpened_pair(SPEC)
    for model in pair.values():
        _sharpen_tower(model)
    return pair


def _sharpen_tower(model):
    gen = torch.Generator().manual_seed(3)
    gains = [torch.rand(SPEC.vit.hidden, generator=gen) + 0.5 for _ in range(SPEC.vit.layers)]
    with torch.no_grad():
        for block, gain in zip(model.model.vision_model.encoder.layers, gains):
            block.self_attn.q_proj.weight.mul_(128)
            block.self_attn.q_proj.bias.mul_(128)
            block.layer_norm1.weight.copy_(gain)
    return model


def _tower_input(px: torch.Tensor) -> torch.Tensor:
    return px.flatten(0, 1)  # [B, tiles, 3, H, W] -> one tile per row, as get_image_features does


def _plain_hidden(model, px: torch.Tensor, layers: int) -> torch.Tensor:
    """The plain tower's hidden states after its first `layers` blocks, run one by one (a
    full tile: no patch mask, as the processor's squared tiles have none)."""
    tower = model.model.vision_model
    with torch.no_grad():
        h = tower.embeddings(pixel_values=px, patch_attention_mask=torch.ones(
            px.shape[0], px.shape[2] // SPEC.patch_size, px.shape[3] // SPEC.patch_size, dtype=torch.bool))
        for block in tower.encoder.layers[:layers]:
            h = block(h, None)
    return h


def _grouped(values: torch.Tensor) -> torch.Tensor:
    """``[tiles, 64]`` per-patch values summed over each 2x2 group of the 8x8 grid, in the
    raster order of Idefics3Connector.pixel_shuffle's output (row-major on the 4x4 grid)."""
    side = SPEC.image_size // SPEC.patch_size
    return values.reshape(-1, side // 2, 2, side // 2, 2).sum((2, 4)).reshape(values.shape[0], -1)


def _plain_attn_scores(model, px: torch.Tensor, layer: int) -> torch.Tensor:
    """`attn@vit.layer{layer}` by hand: block `layer`'s own layer_norm1 and q/k projections
    on the previous blocks' output, softmax over the tile's patches, the attention each
    patch receives averaged over heads and queries, summed per shuffled group."""
    h = _plain_hidden(model, px, layer)
    block, heads = model.model.vision_model.encoder.layers[layer], SPEC.vit.heads
    with torch.no_grad():
        x = block.layer_norm1(h)
        q = block.self_attn.q_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = block.self_attn.k_proj(x).unflatten(-1, (heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return _grouped(probs.mean((1, 2)))


def _plain_features(model, px: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The plain model's features of the kept shuffled tokens: the whole tower (post
    layernorm), the connector's own pixel shuffle, the kept rows, its linear layer."""
    conn = model.model.connector
    with torch.no_grad():
        feats = model.model.vision_model(pixel_values=px).last_hidden_state
        shuffled = conn.pixel_shuffle(feats, conn.scale_factor)
        return conn.modality_projection(shuffled.gather(1, kept[..., None].expand(-1, -1, shuffled.shape[-1])))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    order = scores.argsort(dim=1, descending=True)
    gaps = scores.gather(1, order[:, keep - 1:keep]) - scores.gather(1, order[:, keep:keep + 1])
    assert bool((gaps > 1e-5).all()), "near-tied scores: the reference would be ambiguous"
    return order[:, :keep].sort(dim=1).values


def _one_tile_inputs(batch_inputs: dict) -> dict:
    """The same prompts as a processor without image splitting writes them: one tile per
    image (here the global view), `<fake_token_around_image><global-img>` and its tokens."""
    ids, mask = [], []
    for row, m in zip(batch_inputs["input_ids"], batch_inputs["attention_mask"]):
        row = row[m.bool()].tolist()
        first, last = row.index(IMG), len(row) - row[::-1].index(IMG)
        ids.append(torch.tensor(row[:first - 2] + [3, 99] + [IMG] * PER_TILE + row[last:]))
    ids_t = pad_sequence(ids, batch_first=True, padding_value=PAD, padding_side="left")
    mask_t = pad_sequence([torch.ones_like(r) for r in ids], batch_first=True, padding_value=0, padding_side="left")
    return dict(input_ids=ids_t, attention_mask=mask_t, pixel_values=batch_inputs["pixel_values"][:, -1:])


def _plain_vit_out_run(ref, batch_inputs: dict, keep: int):
    """`keep attn@vit.layer3 top keep` at vit.out by hand on the plain model `ref`: each
    tile's kept shuffled tokens ``[tiles, keep]`` and the 5 greedy tokens of the prompt
    cut to `keep` placeholders per tile, fed those tokens' features."""
    px = _tower_input(batch_inputs["pixel_values"])
    kept = _top(_plain_attn_scores(ref, px, layer=3), keep)
    features = _plain_features(ref, px, kept).reshape(2, -1, ref.config.text_config.hidden_size)
    short = vc.rewrite_inputs(batch_inputs["input_ids"], batch_inputs["attention_mask"], image_token_id=IMG,
                              from_count=PER_TILE, to_count=keep)
    return kept, generate_on_features(ref, short["input_ids"], short["attention_mask"], IMG, features, 5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["tile", "sized", "no-split"])
def test_vit_out_stage_equals_a_plain_loop_per_tile(vit_models, attn, layout):
    """`at vit.out keep attn@vit.layer3 top 6` keeps, in every tile (the global view too),
    the 6 shuffled tokens whose 3x3 (here 2x2) groups receive the most attention at block
    3; the LLM then sees the kept tokens tile by tile. Batch 2, left-padded, on the
    per-tile spec, on the spec sized for the 256x64 image (5 tiles) and without image
    splitting (one tile per image): greedy tokens equal the plain model fed those features
    in the prompt with 6 placeholders per tile."""
    model, keep = vit_models[attn], 6
    batch_inputs = inputs(2) if layout != "no-split" else _one_tile_inputs(inputs(2))
    kept, want = _plain_vit_out_run(fresh_copy(model, attn), batch_inputs, keep)
    spec = {"tile": SPEC, "sized": SPEC.for_image(256, 64), "no-split": replace(SPEC, split_edge=0).for_image(256, 64)}
    with vc.apply(f"at vit.out keep attn@vit.layer3 top {keep}", model, spec=spec[layout]):
        assert vc.image_token_count(model) == keep * (TILES if layout == "sized" else 1)
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["vit.out#0"], kept + 1)  # vids count from 1
    assert torch.equal(got[:, -5:], want)


def test_idefics3_vit_out_stage_equals_a_plain_loop():
    """Idefics3's classes (SmolVLM-Instruct's; the connector's linear inside a SimpleMLP)
    run the same vit.out stage: tiny-smolvlm's config under model_type idefics3, the spec
    sized for the 256x64 image, eager, batch 2."""
    config = builtin_config_dict("tiny-smolvlm")
    config.update(model_type="idefics3", architectures=["Idefics3ForConditionalGeneration"])
    config["vision_config"]["model_type"] = "idefics3_vision"
    spec = spec_from_config(config, name="tiny-idefics3")
    assert (spec.family, spec.merged_features, family_of(spec).name) == ("idefics3", True, "idefics3")
    model = _sharpen_tower(spec.build(device="cpu", attn_implementation="eager", seed=0).eval())
    batch_inputs, keep = inputs(2), 6
    kept, want = _plain_vit_out_run(plain_copy(spec, model), batch_inputs, keep)
    with vc.apply(f"at vit.out keep attn@vit.layer3 top {keep}", model, spec=spec.for_image(256, 64)):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["vit.out#0"], kept + 1)
    assert torch.equal(got[:, -5:], want)


def test_vit_out_gnorm_sums_the_groups_of_a_plain_loop(vit_models):
    """`gnorm@vit.layer2` by hand per tile: block 2's output through block 3's input norm
    (SigLIP's layer_norm1), each patch's L2 norm summed over its shuffled group; the stage
    keeps the 5 largest groups of every tile."""
    model, keep = vit_models["eager"], 5
    batch_inputs = inputs(2)
    px = _tower_input(batch_inputs["pixel_values"])
    with torch.no_grad():
        norms = model.model.vision_model.encoder.layers[3].layer_norm1(_plain_hidden(model, px, 3)).norm(dim=-1)
    want = _top(_grouped(norms), keep) + 1
    with vc.apply(f"at vit.out keep gnorm@vit.layer2 top {keep}", model), torch.no_grad():
        model(**batch_inputs)
        assert torch.equal(vc.kept_tokens(model)["vit.out#0"], want)


VIT_COMPILED = ["at vit.out keep attn@vit.layer3 top 6",
                "at vit.out keep attn@vit.layer2 top 4 + diverse 2 then merge rest into 2 by keys",
                "at vit.out keep gnorm@vit.layer2 top 50%; at llm.layer2 keep text top 50%"]


@pytest.mark.parametrize("src", VIT_COMPILED)
def test_vit_out_compiled_flops_equal_the_cost_model(models, src):
    """On the spec sized for the call's 256x64 image: a vit.out stage works per tile on the
    shuffled tokens, 4 patches wide (diverse's cosines, the merge's), before the linear."""
    assert_flops_equal_the_cost_model(models["eager"], SPEC.for_image(256, 64), src, inputs(1), IMG)


# ---------------------------------------------------------------------------- check time
def test_vit_sites_and_cls_scores_are_refused_where_they_point():
    cases = {"at llm.layer2 keep cls@vit.layer3 top 20": ("cls@", "no-cls", "has no CLS token"),
             "at vit.out keep cls@vit.layer3 top 6": ("cls@", "no-cls", "has no CLS token"),
             "at vit.out keep cls_token + attn@vit.layer3 top 6": ("cls_token", "cls-token", "no CLS token"),
             "at llm.layer2 keep attn@vit.layer3 top 20": ("attn@", "model-layout", "summed over each shuffled")}
    for src, (at, code, words) in cases.items():
        d = first_error(src, SPEC)
        assert (d.span.line, d.span.column, d.code, words in d.message) == (1, src.index(at) + 1, code, True), src
    # a token at vit.out is one shuffled 2x2 group: the tile's grid is 4x4; inside the tower
    # a stage keeps whole groups (tests/test_vit_groups.py), counted alike
    assert check("at vit.out keep attn@vit.layer3 top 50%", SPEC).stages[0].tokens_in == PER_TILE
    assert check("at vit.layer2 keep random 10", SPEC).stages[0].tokens_in == PER_TILE
    assert check("at vit.out pool 2x2", SPEC).stages[0].tokens_out == PER_TILE // 4
    big = get_spec("smolvlm-2.2b")  # 27x27 patches, 3x3 groups: 81 tokens per tile at vit.out
    assert check("at vit.out keep attn@vit.layer20 top 25%", big).stages[0].tokens_in == 81


def test_pooling_an_image_sized_spec_is_refused_per_tile_allowed():
    src = "at llm.layer0 pool 2x2"
    d = first_error(src, SPEC.for_image(256, 64))
    assert (d.span.column, d.code) == (src.index("pool") + 1, "model-layout")
    assert "5 tiles' grids one after the other" in d.message and "per-tile spec" in d.expected
    assert check(src, SPEC).llm_visual[0] == PER_TILE // 4  # each tile's 4x4 grid pooled to 2x2


def test_a_config_without_splitting_counts_one_tile():
    config = builtin_config_dict("smolvlm-2.2b")
    config["vtdsl_preprocessor"] = {**config["vtdsl_preprocessor"], "do_image_splitting": False}
    spec = spec_from_config(config, name="no-split")
    assert spec.split_edge == 0 and spec.for_image(3000, 1000).image_tokens == 81
    assert replace(spec, split_edge=1536).for_image(3000, 1000).image_tokens == (4 * 2 + 1) * 81


def test_a_hub_style_directory_gives_the_registered_spec(tmp_path):
    """HuggingFaceTB/SmolVLM-Instruct's config.json layout (its vision config still named
    `idefics3`, as transformers 4.46 saved it; `rope_theta` flat in the text config) and
    its preprocessor_config.json: the built-in's architecture and tiles."""
    import json

    hub = {
        "architectures": ["Idefics3ForConditionalGeneration"], "model_type": "idefics3", "image_token_id": 49153,
        "scale_factor": 3, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 273768.0, "vocab_size": 49155,
                        "max_position_embeddings": 16384, "tie_word_embeddings": False},
        "vision_config": {"model_type": "idefics3", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Idefics3ImageProcessor", "do_image_splitting": True,
         "size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}}))
    local, builtin = get_spec(str(tmp_path)), get_spec("smolvlm-2.2b")
    fields = ("family", "vit", "llm", "projector", "vocab_size", "image_token_id", "dtype", "image_tokens",
              "spatial_merge", "split_edge", "has_cls")
    assert [getattr(local, f) for f in fields] == [getattr(builtin, f) for f in fields]
    assert local.for_image(1000, 700).image_tokens == 13 * 81
    assert local.param_count() == builtin.param_count()


def test_a_preprocessor_with_other_tiles_is_refused(tmp_path):
    import json

    config = builtin_config_dict("tiny-smolvlm")
    config.pop("vtdsl_preprocessor")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_image_size": {"longest_edge": 32}}))
    from vtdsl.lang.errors import PolicyError

    with pytest.raises(PolicyError, match="max_image_size 32 differs from the vision tower's image_size 64"):
        get_spec(str(tmp_path))
