"""Feed malformed checkpoints to the CLI as a careless user would, and count the ones
that end in anything but a clean refusal (issue 17, item 7).

Config mutations (every key the registry reads: deleted, or set to a string, list, dict,
null, negative, zero, huge, float or bool; sub-configs replaced by non-objects; unknown
model types; widths not divisible by heads) go to `vtdsl check --model DIR` and
`vtdsl compile --model DIR` on tiny LLaVA, LLaVA-NeXT and Qwen2.5-VL configs. Weight
directory mutations (garbage, empty or pickled `model.safetensors`, malformed
`model.safetensors.index.json`, shards with missing or wrongly shaped tensors) go to
`vtdsl compile --model DIR --weights DIR`.

Each run is classified as `ok` (exit 0), `clean` (exit 2, exactly one unindented output
line, which names the file), `unclear` (exit 2, but the message does not name the file or
spans several lines) or `crash` (any other exit, or an exception escaping the command:
what a user sees as a traceback).

    HF_HUB_OFFLINE=1 python scripts/fuzz_checkpoints.py [--verbose]
"""

from __future__ import annotations

import collections
import copy
import json
import os
import signal
import sys
import tempfile

import click

# the tiny two-layer configs the suite's fuzz test mutates
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from test_checkpoint_fuzz import small  # noqa: E402

BAD_VALUES = {"str": "abc", "list": [1], "dict": {}, "null": None, "negative": -1, "zero": 0,
              "huge": 10**12, "float": 3.5, "bool": True}
TOP_KEYS = ("model_type", "vision_config", "text_config", "vision_feature_layer", "vision_feature_select_strategy",
            "image_token_index", "torch_dtype", "tie_word_embeddings", "image_grid_pinpoints")
VISION_KEYS = ("model_type", "hidden_size", "image_size", "intermediate_size", "num_attention_heads",
               "num_hidden_layers", "patch_size", "num_channels", "depth", "num_heads", "spatial_merge_size")
TEXT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")
NO_STAGES = 'policy "none"\n'
ONE_STAGE = 'policy "one"\nat llm.layer1 keep attn top 4\n'


def config_mutations(base: dict):
    """(label, mutated config.json value) pairs."""
    for path in [(k,) for k in TOP_KEYS] + [("vision_config", k) for k in VISION_KEYS] + \
            [("text_config", k) for k in TEXT_KEYS]:
        parent = base
        for key in path[:-1]:
            parent = parent[key]
        if path[-1] not in parent:
            continue
        data = copy.deepcopy(base)
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        yield ".".join(path) + " deleted", data
        for kind, value in BAD_VALUES.items():
            data = copy.deepcopy(base)
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = copy.deepcopy(value)
            yield f"{'.'.join(path)}={kind}", data
    for part in ("vision_config", "text_config"):
        for label, value in (("model_type=unknown", "nonsense"), ("model_type=other tower", "siglip_vision_model")):
            data = copy.deepcopy(base)
            data[part]["model_type"] = value
            yield f"{part}.{label}", data
    data = copy.deepcopy(base)
    data["model_type"] = "llava_nonsense"
    yield "model_type=unknown", data
    for part in ("vision_config", "text_config"):
        data = copy.deepcopy(base)
        heads = "num_heads" if "num_heads" in data[part] else "num_attention_heads"
        data[part]["hidden_size"], data[part][heads] = 30, 4
        yield f"{part}.hidden_size not divisible by heads", data
    yield "top level is a list", [base]
    yield "top level is a string", "llava"


def weight_mutations(good: str):
    """(label, function(directory)) pairs; each function spoils a copy of a good directory."""
    import torch
    from safetensors.torch import load_file, save_file

    def write(name, payload):
        def spoil(path):
            with open(os.path.join(path, name), "wb" if isinstance(payload, bytes) else "w") as fh:
                fh.write(payload)
        return spoil

    def pickle(path):
        torch.save({"x": torch.zeros(2)}, os.path.join(path, "model.safetensors"))

    def index(value):
        def spoil(path):
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
                json.dump(value, fh)
        return spoil

    def retensor(edit):
        def spoil(path):
            file = os.path.join(path, "model.safetensors")
            tensors = load_file(file)
            edit(tensors)
            save_file(tensors, file)
        return spoil

    def drop(tensors):
        tensors.pop(sorted(tensors)[0])

    def reshape(tensors):
        key = sorted(tensors)[0]
        tensors[key] = torch.zeros(3, 5)

    def extra(tensors):
        tensors["nonsense.weight"] = torch.zeros(2)

    def remove(path):
        os.remove(os.path.join(path, "model.safetensors"))

    def truncate(path):
        file = os.path.join(path, "model.safetensors")
        with open(file, "rb") as fh:
            head = fh.read(200)
        with open(file, "wb") as fh:
            fh.write(head)

    yield "model.safetensors garbage", write("model.safetensors", b"\x00garbage" * 64)
    yield "model.safetensors empty", write("model.safetensors", b"")
    yield "model.safetensors is a pickle", pickle
    yield "model.safetensors truncated", truncate
    yield "model.safetensors header not json", write("model.safetensors", (8).to_bytes(8, "little") + b"{not js}")
    yield "no weights", remove
    for label, value in (("list", []), ("null", None), ("string", "x"), ("weight_map list", {"weight_map": [1]}),
                         ("weight_map null", {"weight_map": None}), ("maps to ints", {"weight_map": {"a": 1}}),
                         ("maps to null", {"weight_map": {"a": None}}), ("empty", {"weight_map": {}}),
                         ("missing shard", {"weight_map": {"a": "model-00002.safetensors"}}),
                         ("escapes the directory", {"weight_map": {"a": "../x.safetensors"}})):
        yield f"index.json {label}", index(value)
    yield "index.json not json", write("model.safetensors.index.json", "{")
    yield "tensor missing", retensor(drop)
    yield "tensor wrong shape", retensor(reshape)
    yield "tensor unexpected", retensor(extra)
    yield "config.json garbage", write("config.json", "{")


class Hang(BaseException):
    """A case that ran past its time (a BaseException, so neither the CLI's guard nor
    CliRunner swallows it)."""


def invoke(runner, main, command, seconds: int = 30):
    """runner.invoke under an alarm: a config that makes transformers loop over 1e12
    layers is a failure too, not a reason to wait."""
    def ring(signum, frame):
        raise Hang()

    signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        return runner.invoke(main, command)
    except Hang:
        return None
    finally:
        signal.alarm(0)


def classify(result, names: tuple[str, ...]) -> tuple[str, str]:
    """(verdict, one-line detail) for a CliRunner result."""
    if result is None:
        return "crash", "Hang: no answer within the time limit"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        return "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    if result.exit_code == 0:
        return "ok", ""
    text = (result.stderr or "") + (result.stdout or "")
    lines = [line for line in text.splitlines() if line.strip()]
    heads = [line for line in lines if not line.startswith(" ")]
    if result.exit_code != 2:
        return "crash", f"exit {result.exit_code}: {heads[:1]}"
    if "Traceback" in text or len(heads) != 1 or not any(n in heads[0] for n in names):
        return "unclear", " | ".join(heads)[:200]
    return "clean", heads[0][:200]


def run_cases(verbose: bool) -> collections.Counter:
    from click.testing import CliRunner

    from vtdsl.cli import main
    from vtdsl.models import spec_from_config

    runner = CliRunner()
    counts: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        policies = {}
        for label, text in (("none", NO_STAGES), ("one", ONE_STAGE)):
            policies[label] = os.path.join(tmp, f"{label}.vt")
            with open(policies[label], "w") as fh:
                fh.write(text)

        def record(case, result, names):
            verdict, detail = classify(result, names)
            counts[verdict] += 1
            if verdict in ("crash", "unclear"):
                kinds[detail.split(":")[0] if verdict == "crash" else "unclear"] += 1
            if verbose or verdict == "crash":
                click.echo(f"{verdict:8} {case}: {detail}")

        for base_name in ("tiny-llava", "tiny-llava-next", "tiny-qwen2.5-vl"):
            for label, data in config_mutations(small(base_name)):
                path = os.path.join(tmp, "cfg")
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, "config.json"), "w") as fh:
                    json.dump(data, fh)
                for command in (["check", policies["none"], "--model", path],
                                ["compile", policies["none"], "--model", path]):
                    record(f"{base_name} {command[0]} {label}", invoke(runner, main, command), ("config.json",))

        good = os.path.join(tmp, "good")
        spec_from_config(small("tiny-llava"), name="good").build(device="cpu", seed=0).save_pretrained(good)
        for label, spoil in weight_mutations(good):
            path = os.path.join(tmp, "w-" + label.replace(" ", "_").replace(".", "_"))
            os.makedirs(path)
            for name in os.listdir(good):
                with open(os.path.join(good, name), "rb") as src, open(os.path.join(path, name), "wb") as dst:
                    dst.write(src.read())
            spoil(path)
            command = ["compile", policies["one"], "--model", path, "--weights", path]
            record(f"weights {label}", invoke(runner, main, command),
                   ("model.safetensors", "config.json", "index.json", path))
    click.echo(f"{sum(counts.values())} runs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for kind, n in kinds.most_common():
        click.echo(f"  {n:4} {kind}")
    return counts


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    totals = run_cases("--verbose" in sys.argv)
    sys.exit(1 if totals["crash"] or totals["unclear"] else 0)
