"""Model registry: built-in specs, config -> spec, local directories, build, weights, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from vtdsl.lang.errors import PolicyError
from vtdsl.models import WeightsError, get_spec, list_specs, load_weights, spec_from_config
from vtdsl.models.spec import ModelSpec, TowerDims

ARCH_FIELDS = (
    "family", "vit", "llm", "vocab_size", "image_size", "patch_size", "channels", "has_cls",
    "vision_feature_layer", "select_strategy", "projector", "dtype", "image_token_id",
    "tie_word_embeddings", "vit_layer_path", "projector_path", "llm_layer_path",
)


def same_architecture(a: ModelSpec, b: ModelSpec) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in ARCH_FIELDS)


# ----------------------------------------------------------------- built-ins
# `vtdsl models` order: full-size checkpoints, then their tiny random variants in the same
# family order, then the vtbench models
LISTED = ["llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "llava-next-video-7b", "llava-onevision-qwen2-7b",
          "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "internvl3-8b", "gemma-3-4b", "smolvlm-2.2b",
          "tiny-llava", "tiny-llava-next", "tiny-llava-next-video", "tiny-llava-onevision", "tiny-qwen2-vl",
          "tiny-qwen2.5-vl", "tiny-qwen3-vl", "tiny-internvl3", "tiny-gemma3", "tiny-smolvlm", "tiny-llava-vtbench2", "tiny-llava-vtbench"]


def test_registry_lists_the_builtins():
    assert [s.name for s in list_specs()] == LISTED


def test_llava_15_7b_spec():
    s = get_spec("llava-1.5-7b")
    assert s.family == "llava"
    assert s.vit == TowerDims(layers=24, hidden=1024, ffn=4096, heads=16, kv_heads=16, head_dim=64, mlp="gelu")
    assert s.llm == TowerDims(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, head_dim=128, mlp="swiglu")
    assert (s.image_size, s.patch_size, s.channels) == (336, 14, 3)
    assert (s.patch_tokens, s.vit_tokens, s.image_tokens) == (576, 577, 576)
    assert s.vision_feature_layer == -2 and s.feature_layer_index == 22
    assert s.unused_vit_layers == (23,)
    assert s.select_strategy == "default" and s.has_cls
    assert s.projector == (1024, 4096, 4096)
    assert (s.vocab_size, s.image_token_id, s.dtype, s.dtype_bytes) == (32064, 32000, "float16", 2)
    assert not s.tie_word_embeddings


def test_llava_15_13b_spec():
    s = get_spec("llava-1.5-13b")
    assert s.vit == get_spec("llava-1.5-7b").vit
    assert s.llm == TowerDims(layers=40, hidden=5120, ffn=13824, heads=40, kv_heads=40, head_dim=128, mlp="swiglu")
    assert s.projector == (1024, 5120, 5120)
    assert s.image_tokens == 576 and s.vocab_size == 32064


def test_tiny_llava_matches_contract():
    s = get_spec("tiny-llava")
    # llava-1.5-7b's geometry (layers, patches, feature layer) with tiny widths
    assert s.vit == TowerDims(layers=24, hidden=32, ffn=64, heads=4, kv_heads=4, head_dim=8, mlp="gelu")
    assert s.llm == TowerDims(layers=32, hidden=32, ffn=64, heads=4, kv_heads=2, head_dim=8, mlp="swiglu")
    assert (s.image_size, s.patch_size) == (336, 14)
    assert (s.patch_tokens, s.vit_tokens, s.image_tokens) == (576, 577, 576)  # (336 // 14) ** 2 = 24 * 24
    assert s.projector == (32, 32, 32)
    assert (s.vocab_size, s.image_token_id, s.dtype) == (256, 255, "float32")
    assert s.vision_feature_layer == -2 and s.select_strategy == "default"
    assert s.feature_layer_index == 22 and s.unused_vit_layers == (23,)  # as llava-1.5-7b
    assert s.config().text_config.max_position_embeddings == 2048


def test_aliases_and_case():
    assert get_spec("LLaVA-1.5-7B") is get_spec("llava-1.5-7b")
    assert get_spec("llava-hf/llava-1.5-7b-hf") is get_spec("llava-1.5-7b")
    assert get_spec("llava-hf/llava-1.5-13b-hf").name == "llava-1.5-13b"


def test_unknown_model_name_has_did_you_mean():
    with pytest.raises(PolicyError) as info:
        get_spec("llava-1.5-7")
    text = str(info.value)
    assert "unknown model 'llava-1.5-7'" in text
    assert "did you mean 'llava-1.5-7b'?" in text
    assert "tiny-llava" in text  # the expected line lists the built-ins


def test_unknown_model_far_from_anything_has_no_hint():
    with pytest.raises(PolicyError) as info:
        get_spec("gpt-4")
    assert "unknown model 'gpt-4'" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_missing_directory_and_directory_without_config(tmp_path):
    with pytest.raises(PolicyError, match="no such model directory"):
        get_spec(str(tmp_path / "nowhere"))
    with pytest.raises(PolicyError, match="has no config.json"):
        get_spec(str(tmp_path))


# ----------------------------------------------------------------- config -> spec
def test_spec_from_user_config_and_model():
    tiny = get_spec("tiny-llava")
    config = tiny.config()
    from_config = spec_from_config(config, name="mine")
    assert from_config.name == "mine"
    assert same_architecture(from_config, tiny)
    model = tiny.build("meta")
    assert same_architecture(spec_from_config(model), tiny)
    # the spec keeps its own copy: changing the user's config later changes nothing
    config.text_config.num_hidden_layers = 99
    assert from_config.config().text_config.num_hidden_layers == 32


def test_spec_from_config_reads_gqa_and_strategy():
    config = get_spec("tiny-llava").config()
    config.vision_feature_select_strategy = "full"
    config.text_config.num_key_value_heads = 1
    s = spec_from_config(config)
    assert s.image_tokens == 577 and s.llm.kv_heads == 1  # "full" keeps the CLS: 576 patches + 1


def test_unsupported_architectures_are_policy_errors():
    with pytest.raises(PolicyError, match="unsupported model type 'paligemma'"):
        spec_from_config({"model_type": "paligemma"})
    config = get_spec("tiny-llava").config()
    config.vision_feature_layer = [-2, -5]
    with pytest.raises(PolicyError, match="multi-layer image features"):
        spec_from_config(config)


def test_local_directory_spec(tmp_path):
    tiny = get_spec("tiny-llava")
    tiny.config().save_pretrained(tmp_path / "my-llava")
    s = get_spec(str(tmp_path / "my-llava"))
    assert s.name == "my-llava" and s.source == str(tmp_path / "my-llava")
    assert same_architecture(s, tiny)


# ----------------------------------------------------------------- build
def _independent_llava_params(c) -> int:
    """Parameter count of LlavaForConditionalGeneration from its config, by hand."""
    v, t = c.vision_config, c.text_config
    dv, fv = v.hidden_size, v.intermediate_size
    patches = (v.image_size // v.patch_size) ** 2
    vit = dv + v.num_channels * v.patch_size**2 * dv + (patches + 1) * dv  # CLS, conv (no bias), positions
    vit += 2 * dv + 2 * dv  # pre- and post-layernorm
    vit += v.num_hidden_layers * (4 * (dv * dv + dv) + dv * fv + fv + fv * dv + dv + 2 * 2 * dv)
    d, f, V = t.hidden_size, t.intermediate_size, t.vocab_size
    hd = d // t.num_attention_heads
    kv = t.num_key_value_heads * hd
    proj = dv * d + d + d * d + d
    llm = V * d + t.num_hidden_layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d
    head = 0 if t.tie_word_embeddings else V * d
    return vit + proj + llm + head


def test_llava_7b_builds_on_meta_with_the_known_parameter_count():
    s = get_spec("llava-1.5-7b")
    model = s.build(device="meta")
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert model.dtype == torch.float16
    assert model.config._attn_implementation == "sdpa"
    n = sum(p.numel() for p in params)
    assert n == _independent_llava_params(s.config()) == s.param_count()
    assert round(n / 1e9, 2) == 7.06
    # sites named by the spec exist in the module tree
    names = dict(model.named_modules())
    assert s.vit_layer_path.format(i=23) in names and s.llm_layer_path.format(i=31) in names
    assert s.projector_path in names


def test_13b_and_tiny_parameter_counts():
    for name in ("llava-1.5-13b", "tiny-llava"):
        s = get_spec(name)
        assert s.param_count() == _independent_llava_params(s.config())
    assert round(get_spec("llava-1.5-13b").param_count() / 1e9, 2) == 13.35


def test_tiny_build_is_seeded_and_deterministic():
    s = get_spec("tiny-llava")
    before = torch.random.get_rng_state()
    a, b, c = s.build("cpu"), s.build("cpu"), s.build("cpu", seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.dtype == torch.float32 and not a.training
    assert a.config._attn_implementation == "sdpa"
    assert s.build("cpu", attn_implementation="eager").config._attn_implementation == "eager"
    assert s.build("cpu", dtype="bfloat16").dtype == torch.bfloat16


# ----------------------------------------------------------------- weights
def _tiny_inputs(spec):
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((1, spec.image_tokens), spec.image_token_id), torch.randint(0, 200, (1, 8), generator=g)], 1)
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
    return ids, pixels


def test_load_weights_round_trip(tmp_path):
    spec = get_spec("tiny-llava")
    original = spec.build("cpu", seed=3)
    original.save_pretrained(tmp_path, safe_serialization=True)  # hub key layout
    loaded = load_weights(spec, str(tmp_path))
    so, sl = original.state_dict(), loaded.state_dict()
    assert so.keys() == sl.keys() and all(torch.equal(so[k], sl[k]) for k in so)
    ids, pixels = _tiny_inputs(spec)
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids, pixel_values=pixels).logits, loaded(input_ids=ids, pixel_values=pixels).logits)


def test_load_weights_current_key_layout_and_shards(tmp_path):
    from safetensors.torch import save_file

    spec = get_spec("tiny-llava")
    state = {k: v.contiguous() for k, v in spec.build("cpu", seed=4).state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_weights(spec, str(tmp_path)).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_weights_refuses_partial_or_foreign_checkpoints(tmp_path):
    from safetensors.torch import save_file

    spec = get_spec("tiny-llava")
    state = {k: v.contiguous() for k, v in spec.build("cpu").state_dict().items()}
    missing = dict(state)
    missing.pop("model.multi_modal_projector.linear_1.weight")
    (tmp_path / "a").mkdir()
    save_file(missing, tmp_path / "a" / "model.safetensors")
    with pytest.raises(WeightsError, match="1 missing .*linear_1.weight"):
        load_weights(spec, str(tmp_path / "a"))

    extra = dict(state, **{"model.extra.weight": torch.zeros(2)})
    (tmp_path / "b").mkdir()
    save_file(extra, tmp_path / "b" / "model.safetensors")
    with pytest.raises(WeightsError, match="1 unexpected"):
        load_weights(spec, str(tmp_path / "b"))

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(WeightsError, match="safetensors only"):
        load_weights(spec, str(tmp_path / "c"))

    # a directory whose config describes another architecture
    (tmp_path / "d").mkdir()
    save_file(state, tmp_path / "d" / "model.safetensors")
    other = spec.config()
    other.text_config.num_hidden_layers = 3
    other.save_pretrained(tmp_path / "d")
    with pytest.raises(WeightsError, match="different architecture"):
        load_weights(spec, str(tmp_path / "d"))


def test_load_weights_uses_the_spec_source(tmp_path):
    spec = get_spec("tiny-llava")
    model = spec.build("cpu", seed=5)
    model.save_pretrained(tmp_path)
    local = get_spec(str(tmp_path))
    loaded = load_weights(local)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert os.path.samefile(local.source, tmp_path)


# ----------------------------------------------------------------- CLI
def _cli():
    from vtdsl.cli.models_cmd import models

    return models


def test_cli_models_json():
    result = CliRunner().invoke(_cli(), ["--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["models"]}
    assert list(rows) == LISTED
    assert rows["llava-1.5-7b"]["params"] == 7_063_427_072
    assert rows["llava-1.5-7b"]["visual_tokens"] == 576
    assert (rows["tiny-llava"]["vit_layers"], rows["tiny-llava"]["llm_layers"]) == (24, 32)


def test_cli_models_table_help_and_bad_dir(tmp_path):
    runner = CliRunner()
    result = runner.invoke(_cli(), [])
    assert result.exit_code == 0
    assert "llava-1.5-7b" in result.output and "7.06B" in result.output and "576" in result.output
    help_text = runner.invoke(_cli(), ["--help"]).output
    assert "Example" in help_text and "vtdsl models --json" in help_text
    bad = runner.invoke(_cli(), [str(tmp_path)])
    assert bad.exit_code == 2 and "has no config.json" in bad.output


def test_register_spec():
    from dataclasses import replace

    from vtdsl.models import register_spec
    from vtdsl.models import registry

    calls = []

    def factory():
        calls.append(1)
        return replace(get_spec("tiny-llava"), name="tiny-registered")

    register_spec("tiny-registered", factory)
    try:
        assert get_spec("tiny-registered").name == "tiny-registered"
        assert get_spec("Tiny-Registered") is get_spec("tiny-registered") and calls == [1]
        assert "tiny-registered" in [s.name for s in list_specs()]
        with pytest.raises(PolicyError, match="did you mean 'tiny-registered'"):
            get_spec("tiny-registred")
        with pytest.raises(ValueError, match="built-in"):
            register_spec("llava-1.5-7b", factory)
    finally:
        registry._REGISTERED.pop("tiny-registered", None)
        registry._REGISTERED_SPECS.pop("tiny-registered", None)


@pytest.mark.parametrize("name, hub_key", [
    # llava-hf/llava-v1.6-*: LLaVA-1.5's layout plus the newline vector at the top level
    ("tiny-llava-next", lambda k: ("image_newline" if k == "model.image_newline" else
                                   k.replace("model.language_model.", "language_model.model.")
                                    .replace("model.vision_tower.", "vision_tower.vision_model.")
                                    .replace("model.multi_modal_projector.", "multi_modal_projector.")
                                    .replace("lm_head.", "language_model.lm_head."))),
    # Qwen/Qwen2.5-VL-*: `visual.*`, the text model under `model.*`
    ("tiny-qwen2.5-vl", lambda k: k.replace("model.visual.", "visual.").replace("model.language_model.", "model.")),
])
def test_load_weights_from_hub_layouts_of_the_new_families(tmp_path, name, hub_key):
    from safetensors.torch import save_file

    spec = get_spec(name)
    state = {k: v.contiguous() for k, v in spec.build("cpu", seed=5).state_dict().items()}
    hub = {hub_key(k): v for k, v in state.items()}
    assert len(set(hub) - set(state)) > len(state) // 2  # the layouts really differ
    save_file(hub, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_weights(spec, str(tmp_path)).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
