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
from plain_refs import plain_copy, first_error, sharpened_pair

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


# ---------------------------------------------------------------------------- check time
def test_vit_sites_and_cls_scores_are_refused_where_they_point():
    cases = {"at llm.layer2 keep cls@vit.layer3 top 20": ("cls@", "no-cls", "has no CLS token"),
             "at vit.layer2 keep random 10": ("vit.layer2", "model-layout", "whole 2x2 groups"),
             "at vit.out keep random 10": ("vit.out", "model-layout", "merges 2x2 groups of ViT patches")}
    for src, (at, code, words) in cases.items():
        d = first_error(src, SPEC)
        assert (d.span.line, d.span.column, d.code, words in d.message) == (1, src.index(at) + 1, code, True), src


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
