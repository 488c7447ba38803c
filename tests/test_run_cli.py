"""`vtdsl run`: one answer from real weights — the shipped model, a sharded bfloat16
checkpoint written by `save_pretrained` — and float32 scores in a bfloat16 model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

import vtdsl.compiler as vc
from vtdsl.cli import main
from vtdsl.eval.bench import generate, prompt
from vtdsl.ir import check
from vtdsl.lang.source import parse_text

NAME = "tiny-llava-vtbench"
HALF = 'policy "half"\nat vit.out keep cls top 72\n'


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    ex = generate("val", 3)[2]
    path = tmp_path_factory.mktemp("img") / "scene.png"
    ex.image.save(path)
    return ex, path


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory):
    """A random vtbench-shaped LLaVA saved in bfloat16 as several safetensors shards with
    an index, with its processor: what a user's HF directory looks like."""
    from vtdsl.eval.train import build_model, build_processor

    path = tmp_path_factory.mktemp("sharded-bf16")
    processor = build_processor()
    model = build_model(processor.tokenizer, seed=1).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2MB")
    processor.save_pretrained(path)
    return path


def test_run_on_the_shipped_model_answers_as_the_harness_predicts(example, tmp_path):
    from vtdsl.cost import estimate
    from vtdsl.eval.harness import evaluate
    from vtdsl.models.vtbench import load_tiny_vtbench, vtbench_spec

    ex, image = example
    policy = tmp_path / "half.vt"
    policy.write_text(HALF)
    result = run(["run", policy, "--image", image, "--question", ex.question, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model, processor = load_tiny_vtbench()
    spec = vtbench_spec()
    plan = check(parse_text(HALF), spec)
    with vc.apply(plan, model, spec=spec):
        direct = evaluate(model, [ex], processor, progress=False, return_predictions=True)
    assert data["answer"] == direct["predictions"][0]
    assert data["kept"] == [{"site": "vit.out#0", "tokens_in": 144, "tokens_out": 72}]
    text = len(processor.tokenizer(prompt(ex.question, 0))["input_ids"])  # the prompt without its image
    assert data["flops_ratio"] == pytest.approx(estimate(plan, text_tokens=text).flops_ratio)
    assert data["dtype"] == "float32" and data["device"] == "cpu" and data["prefill_ms"] > 0
    assert data["model"] == NAME and data["policy"] == "half"
    plain = run(["run", policy, "--image", image, "--question", ex.question])
    assert plain.exit_code == 0 and plain.stdout == data["answer"] + "\n"


def test_run_loads_a_sharded_bfloat16_checkpoint(sharded_bf16, example, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtdsl.eval.data import encode

    shards = [f for f in os.listdir(sharded_bf16) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and (sharded_bf16 / "model.safetensors.index.json").is_file()
    assert json.loads((sharded_bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    ex, image = example
    policy = tmp_path / "half.vt"
    policy.write_text(HALF)
    result = run(["run", policy, "--weights", sharded_bf16, "--image", image, "--question", ex.question,
                  "--max-new-tokens", 3, "--device", "auto", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dtype"] == "bfloat16" and data["weights"] == str(sharded_bf16)
    # transformers' own loader, the same policy, the same greedy decoding
    model = LlavaForConditionalGeneration.from_pretrained(sharded_bf16, local_files_only=True).eval()
    assert model.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(sharded_bf16, local_files_only=True)
    inputs = encode(processor, [ex.image.convert("RGB")], [ex.question])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with vc.apply(HALF, model), torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert data["answer"] == expected.strip()
    as_fp32 = run(["run", policy, "--weights", sharded_bf16, "--image", image, "--question", ex.question,
                   "--max-new-tokens", 1, "--dtype", "float32", "--json"])
    assert as_fp32.exit_code == 0, as_fp32.output
    assert json.loads(as_fp32.stdout)["dtype"] == "float32"


def test_run_bad_inputs_are_one_line_errors(example, tmp_path):
    ex, image = example
    policy = tmp_path / "half.vt"
    policy.write_text(HALF)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    cases = [
        (["--image", not_image], "cannot read image"),
        (["--image", tmp_path / "missing.png"], "cannot read image"),
        (["--image", image, "--weights", tmp_path / "nowhere"], "no such model directory"),
        (["--image", image, "--weights", tmp_path], "has no config.json"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--image", image, "--device", "cuda"], "device 'cuda' is not available"))
    for extra, message in cases:
        result = run(["run", policy, "--question", ex.question, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.stderr and "Traceback" not in result.output


def _stage_scores(dtype: str, source: str, examples):
    """Per image: the stage's float scores over its candidates, and the raster ids it kept."""
    from vtdsl.eval.data import encode
    from vtdsl.models.loading import load_pretrained

    loaded = load_pretrained(NAME, device="cpu", dtype=dtype)
    inputs = encode(loaded.processor, [e.image for e in examples], [e.question for e in examples])
    inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
    plan = check(parse_text(source), loaded.spec)
    with vc.apply(plan, loaded.model, spec=loaded.spec):
        log = vc.compiled(loaded.model).log
        log.record = True
        with torch.inference_mode():
            loaded.model(**inputs, use_cache=False, logits_to_keep=1)
        (key,) = log.scores
        return [(log.scores[key][b], log.inputs[key][b], set(log.outputs[key][b].tolist()))
                for b in range(len(examples))]


@pytest.mark.parametrize("source,kept", [("at vit.layer2 keep cls top 72", 72),
                                         ("at llm.layer2 keep text top 50%", 72)])
def test_bfloat16_and_float32_keep_the_same_well_separated_tokens(source, kept):
    examples = generate("val", 6)
    fp32 = _stage_scores("float32", source, examples)
    bf16 = _stage_scores("bfloat16", source, examples)
    # bfloat16 resolves 8 significant bits: at the scale of the largest score a step is
    # max|s| / 2^7; a token whose score is farther than that from the cut is not close.
    separated = 0
    for (s32, ids32, kept32), (s16, ids16, kept16) in zip(fp32, bf16):
        assert s16.dtype == torch.float32  # scored in float32 although the model is bfloat16
        assert torch.equal(ids32, ids16)
        ordered = s32.sort(descending=True).values
        cut = (ordered[kept - 1] + ordered[kept]) / 2
        step = s32.abs().max() / 2**7
        for score, vid in zip(s32.tolist(), ids32.tolist()):
            if abs(score - cut) > step:
                separated += 1
                assert (vid in kept16) == (vid in kept32) == (score > cut)
        if ordered[kept - 1] - ordered[kept] > 2 * step:
            assert kept16 == kept32  # a cut wider than bfloat16's resolution: the same tokens
    assert separated >= len(examples) * 144 // 2  # most tokens are well separated: the check has teeth


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    """A random tiny LLaVA-NeXT directory (anyres crops) with its own LlavaNextProcessor."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from vtdsl.eval.train import build_processor
    from vtdsl.models import spec_from_config
    from vtdsl.models.builtins import builtin_config_dict

    path = tmp_path_factory.mktemp("llava-next")
    tokenizer = build_processor().tokenizer
    config = builtin_config_dict("tiny-llava-next")
    config["image_token_index"] = tokenizer.convert_tokens_to_ids("<image>")
    spec_from_config(config, name="user-next").build(device="cpu", seed=0).save_pretrained(path)
    images = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                     image_grid_pinpoints=config["image_grid_pinpoints"])
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, image_token="<image>",
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)
    return path


@pytest.mark.parametrize("height,width", [(96, 96), (45, 60)])
def test_run_on_a_llava_next_directory_costs_each_image_size(llava_next_dir, tmp_path, height, width):
    from PIL import Image

    from vtdsl.cost import estimate
    from vtdsl.models import get_spec

    image = tmp_path / "scene.png"
    Image.new("RGB", (width, height), (200, 30, 30)).save(image)
    policy = tmp_path / "fastv.vt"
    policy.write_text("at llm.layer2 keep text top 50%\n")
    result = run(["run", policy, "--weights", llava_next_dir, "--image", image, "--question", "What color is it?",
                  "--max-new-tokens", 2, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    sized = get_spec(str(llava_next_dir)).for_image(height, width)  # anyres: crops follow the image
    assert data["kept"] == [{"site": "llm.layer2#0", "tokens_in": sized.image_tokens,
                             "tokens_out": sized.image_tokens // 2}]
    text = len(build_tokenizer()("USER: \nWhat color is it? ASSISTANT:")["input_ids"])
    plan = check(parse_text("at llm.layer2 keep text top 50%\n"), sized)
    assert data["flops_ratio"] == pytest.approx(estimate(plan, text_tokens=text).flops_ratio)


def build_tokenizer():
    from vtdsl.eval.train import build_processor

    return build_processor().tokenizer
