"""Malformed checkpoints get one located refusal, never a traceback (issue 17, item 7).

Hypothesis mutates config.json (any key of the top level or a sub-config deleted or set to
junk) under `vtdsl check --model DIR`, and weight directories (junk bytes as
model.safetensors, junk index files) under `vtdsl compile --model DIR --weights DIR`: each
run ends in exit 0, or in exit 2 with exactly one error line that names the file. Explicit
cases pin the message for every crash kind the issue's fuzzing found.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtdsl.cli import main
from vtdsl.models import get_spec, spec_from_config
from vtdsl.models.builtins import BUILTINS, builtin_config_dict
from vtdsl.models.validate import check_config

BASES = ("tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ_WEIGHTS = settings(FUZZ, max_examples=90)

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**15), 10**15), st.floats(), st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2),
)


def small(name: str) -> dict:
    """A built-in tiny config cut to two layers per tower, so building and loading are quick."""
    data = builtin_config_dict(name)
    if "depth" in data["vision_config"]:
        data["vision_config"].update(depth=2, fullatt_block_indexes=[1])
    else:
        data["vision_config"]["num_hidden_layers"] = 2
    data["text_config"]["num_hidden_layers"] = 2
    return data


def key_paths(data: dict) -> list[tuple[str, ...]]:
    paths = [(k,) for k in data]
    for part in ("vision_config", "text_config"):
        paths += [(part, k) for k in data[part]]
    return paths


def mutate(data: dict, path: tuple[str, ...], value) -> dict:
    """A copy of `data` with `path` deleted (`value` is `delete`) or set to `value`."""
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value == "delete":
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    return data


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refusal(result) -> str:
    """The one error line of a clean refusal (exit 2); fails the test on anything else."""
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not escaped, f"{type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    heads = [line for line in result.output.splitlines() if line.strip() and not line.startswith(" ")]
    assert len(heads) == 1, result.output
    return heads[0]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "none.vt"
    path.write_text('policy "none"\n')
    return path


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "tiny"
    spec_from_config(small("tiny-llava"), name="tiny").build(device="cpu", seed=0).save_pretrained(path)
    return path


_fresh = itertools.count()


def config_dir(root, data) -> str:
    # a new directory each time: specs are cached by directory and mtime
    path = root / f"cfg{next(_fresh)}"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(data))
    return path


def weights_copy(root, good) -> str:
    path = root / f"w{next(_fresh)}"
    shutil.copytree(good, path)
    return path


# ---------------------------------------------------------------- property tests
@FUZZ
@given(data=st.data(), base=st.sampled_from(BASES), n=st.integers(1, 3), command=st.sampled_from(["check", "compile"]))
def test_any_config_mutation_is_accepted_or_refused_naming_config_json(data, base, n, command, policy, tmp_path):
    config = small(base)
    for _ in range(n):
        if not isinstance(config, dict) or any(not isinstance(config.get(p), dict) for p in ("vision_config",
                                                                                              "text_config")):
            break
        path = data.draw(st.sampled_from(key_paths(config)))
        config = mutate(config, path, data.draw(st.one_of(st.just("delete"), junk)))
    result = invoke(command, policy, "--model", config_dir(tmp_path, config))
    if result.exit_code != 0:
        assert "config.json" in refusal(result)


index_values = st.one_of(
    junk,
    st.fixed_dictionaries({"weight_map": junk}),
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=4), st.one_of(junk, st.text(max_size=12)),
                                                         max_size=3)}),
)


# a safetensors header (8-byte length, then JSON) that parses but describes junk tensors
tensor_entry = st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(["F32", "F16", "I64", "XX"]), junk),
                                      "shape": st.one_of(st.lists(st.integers(-2, 4), max_size=3), junk),
                                      "data_offsets": st.one_of(st.lists(st.integers(-2, 64), max_size=3), junk)})
headers = st.dictionaries(st.sampled_from(["lm_head.weight", "x", "__metadata__"]), tensor_entry, max_size=3)


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


@FUZZ_WEIGHTS
@given(kind=st.sampled_from(["safetensors", "header", "index"]), payload=st.binary(max_size=96), header=headers,
       index=index_values)
def test_any_weight_directory_mutation_is_refused_naming_the_directory(kind, payload, header, index, good_dir,
                                                                       tmp_path, policy):
    path = weights_copy(tmp_path, good_dir)
    if kind == "safetensors":
        (path / "model.safetensors").write_bytes(payload)
    elif kind == "header":
        (path / "model.safetensors").write_bytes(safetensors_bytes(header, payload))
    else:
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    result = invoke("compile", policy, "--model", path, "--weights", path)
    if result.exit_code != 0:
        assert str(path) in refusal(result)


# ---------------------------------------------------------------- the crash kinds the issue found
CONFIG_CASES = [
    # transformers' strict-dataclass validation, located in its sub-config
    (("vision_config", "hidden_act"), 5,
     "vision_config.hidden_act: Field 'hidden_act' expected str, got int (value: 5)"),
    (("vision_feature_select_strategy",), "x",
     "vision_feature_select_strategy: Field 'vision_feature_select_strategy' expected one of ('default', 'full'), "
     "got x"),
    # ZeroDivisionError in the registry on zero heads / sizes
    (("vision_config", "num_attention_heads"), 0, "vision_config.num_attention_heads: 0 is out of range"),
    (("vision_config", "patch_size"), 0, "vision_config.patch_size: 0 is out of range"),
    # unhashable type: 'list' (a model_type that is not a string)
    (("model_type",), ["llava"], 'model_type: unsupported model type ["llava"]'),
    # 'str' object has no attribute 'items' (a sub-config that is not an object)
    (("text_config",), "llama", "text_config: expected a JSON object, got string 'llama'"),
    # IndexError (a pinpoint that is not a pair)
    (("image_grid_pinpoints",), [[56]], "image_grid_pinpoints[0]: expected [height, width], got list"),
    # widths not divisible by heads; a size that would allocate forever
    (("text_config", "hidden_size"), 30, "text_config.hidden_size: 30 is not divisible by num_attention_heads (4)"),
    (("text_config", "num_hidden_layers"), 10**12, "text_config.num_hidden_layers: 1000000000000 is out of range"),
    # AttributeError (no torch.abc) and IndexError (a list) from transformers' dtype parsing
    (("torch_dtype",), "abc", "torch_dtype: unsupported dtype 'abc'"),
    (("torch_dtype",), ["float32"], 'torch_dtype: unsupported dtype ["float32"]'),
    # AttributeError: a vision config where the language model goes
    (("text_config", "model_type"), "siglip_vision_model",
     "text_config.model_type: unsupported language model 'siglip_vision_model'"),
]


@pytest.mark.parametrize(("path", "value", "message"), CONFIG_CASES, ids=[".".join(c[0]) for c in CONFIG_CASES])
def test_config_crash_kinds_are_located_refusals(path, value, message, policy, tmp_path):
    base = "tiny-llava-next" if path == ("image_grid_pinpoints",) else "tiny-llava"
    directory = config_dir(tmp_path, mutate(small(base), path, value))
    for command in ("check", "compile"):
        line = refusal(invoke(command, policy, "--model", directory))
        assert line == f"{directory / 'config.json'}: error: {message}"


def test_a_config_that_is_not_an_object_is_refused(policy, tmp_path):
    directory = config_dir(tmp_path, [small("tiny-llava")])
    assert refusal(invoke("check", policy, "--model", directory)) == \
        f"{directory / 'config.json'}: error: expected a JSON object, got list"


def _pickle(path):
    torch.save({"x": torch.zeros(2)}, path / "model.safetensors")


WEIGHT_CASES = [
    ("garbage", lambda p: (p / "model.safetensors").write_bytes(b"\x00garbage" * 8), "model.safetensors"),
    ("empty", lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors"),
    ("pickle", _pickle, "model.safetensors"),
    ("index list", lambda p: (p / "model.safetensors.index.json").write_text("[]"), "index.json"),
    ("index null", lambda p: (p / "model.safetensors.index.json").write_text("null"), "index.json"),
    ("index ints", lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": {"a": 1}}'),
     "index.json"),
    ("index escapes", lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x"}}'),
     "index.json"),
]


@pytest.mark.parametrize(("spoil", "file"), [c[1:] for c in WEIGHT_CASES], ids=[c[0] for c in WEIGHT_CASES])
def test_weight_crash_kinds_are_located_refusals(spoil, file, good_dir, policy, tmp_path):
    path = weights_copy(tmp_path, good_dir)
    spoil(path)
    line = refusal(invoke("compile", policy, "--model", path, "--weights", path))
    shown = path / ("model.safetensors.index.json" if file == "index.json" else file)
    assert line.startswith(f"error: WeightsError: {shown}: "), line


def test_a_pickle_named_model_safetensors_is_never_unpickled(good_dir, policy, tmp_path, monkeypatch):
    import pickle

    path = weights_copy(tmp_path, good_dir)
    _pickle(path)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert "not a readable safetensors file" in refusal(invoke("compile", policy, "--model", path, "--weights", path))


def test_the_unspoilt_directory_compiles(good_dir, policy):
    assert invoke("compile", policy, "--model", good_dir, "--weights", good_dir).exit_code == 0


# ---------------------------------------------------------------- run and eval load the same way
@pytest.fixture(scope="module")
def served_dir(tmp_path_factory):
    """A random vtbench-shaped LLaVA with its processor: what `run` and `eval` need."""
    from PIL import Image

    from vtdsl.eval.train import build_model, build_processor

    path = tmp_path_factory.mktemp("served") / "model"
    processor = build_processor()
    build_model(processor.tokenizer, seed=0).save_pretrained(path)
    processor.save_pretrained(path)
    image = path.parent / "red.png"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(image)
    (path.parent / "data.jsonl").write_text(json.dumps({"image": "red.png", "question": "color?", "answer": "red"})
                                            + "\n")
    return path


def _heads_zero(path):
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 0
    (path / "config.json").write_text(json.dumps(config))


SERVED_CASES = [
    ("config heads zero", _heads_zero, "config.json: error: vision_config.num_attention_heads: 0 is out of range"),
    ("safetensors garbage", WEIGHT_CASES[0][1], "model.safetensors: not a readable safetensors file"),
    ("index list", WEIGHT_CASES[3][1], "model.safetensors.index.json: weight_map: expected an object"),
]


@pytest.mark.parametrize("command", ["run", "eval", "eval --data"])
@pytest.mark.parametrize(("spoil", "message"), [c[1:] for c in SERVED_CASES], ids=[c[0] for c in SERVED_CASES])
def test_run_and_eval_refuse_a_malformed_weights_directory(command, spoil, message, served_dir, policy, tmp_path):
    path = weights_copy(tmp_path, served_dir)
    spoil(path)
    extra = {"run": ["--image", served_dir.parent / "red.png", "--question", "color?"],
             "eval": ["--n", 1],
             "eval --data": ["--data", served_dir.parent / "data.jsonl"]}[command]
    result = invoke(command.split()[0], policy, "--weights", path, *extra)
    line = refusal(result)
    assert str(path) in line and message in line, line


@pytest.mark.parametrize(("name", "text", "message"), [
    ("config.json", b"\xff\xfe{}", "not UTF-8 text"),
    ("config.json", b"[" * 100_000, "JSON nested too deeply"),
    ("preprocessor_config.json", b"[1]", "expected a JSON object, got list"),
    ("preprocessor_config.json", b'{"size": [1]}', "size: expected a JSON object, got list"),
    ("preprocessor_config.json", b'{"min_pixels": "many"}', "min_pixels: expected an integer, got string 'many'"),
], ids=["not utf-8", "deep", "processor list", "processor size", "processor pixels"])
def test_unreadable_json_files_are_located_refusals(name, text, message, policy, tmp_path):
    directory = config_dir(tmp_path, small("tiny-qwen2.5-vl"))
    (directory / name).write_bytes(text)
    assert refusal(invoke("check", policy, "--model", directory)) == f"{directory / name}: error: {message}"


def test_weights_that_do_not_fit_a_huge_config_are_refused_before_allocating(good_dir, policy, tmp_path):
    # 2**20-wide Llama layers would be terabytes on the CPU: the headers are compared with
    # the architecture on the meta device first
    path = weights_copy(tmp_path, good_dir)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["hidden_size"] = 1 << 20
    (path / "config.json").write_text(json.dumps(config))
    line = refusal(invoke("compile", policy, "--model", path, "--weights", path))
    assert line.startswith(f"error: WeightsError: weights in {path} do not fit"), line
    assert "with the wrong shape" in line


def test_a_deleted_head_count_whose_default_does_not_fit_is_refused(policy, tmp_path):
    # Qwen2.5-VL's text config defaults to more heads than a 32-wide tiny model has
    # dimensions: a head_dim of 0, which divided by zero in the cost model
    directory = config_dir(tmp_path, mutate(small("tiny-qwen2.5-vl"), ("text_config", "num_attention_heads"), "delete"))
    line = refusal(invoke("check", policy, "--model", directory))
    assert line.startswith(f"{directory / 'config.json'}: error: text_config: ") and "no head dimension" in line


def test_null_head_dim_and_kv_heads_mean_derived(policy, tmp_path):
    # transformers derives both (hidden / heads, and heads: no GQA); hub configs write null
    config = small("tiny-llava")
    config["text_config"].update(head_dim=None, num_key_value_heads=None)
    directory = config_dir(tmp_path, config)
    result = invoke("check", policy, "--model", directory, "--json")
    assert result.exit_code == 0, result.output
    llm = get_spec(str(directory)).llm
    assert (llm.heads, llm.kv_heads, llm.head_dim) == (4, 4, 8)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_built_in_hub_config_passes_the_checks(name):
    # the built-ins are the hub's config.json files: the checks must never refuse a real one
    check_config(builtin_config_dict(name), f"{name}/config.json")
