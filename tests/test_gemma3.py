"""Gemma 3 (issue 19 item 4): the specs from the published config, token counts against
transformers' own image processor (pan-and-scan off and on), the cost model against
FlopCounterMode part by part, compiled LLM stages against a reference whose masks are
built here by hand (bidirectional image blocks, sliding windows, padding), and the
located refusals of ViT-side stages. Expected numbers are computed here from the
architecture, not read from vtdsl."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.compiler.families import family_of
from vtdsl.cost import estimate, estimate_counts
from vtdsl.ir import check
from vtdsl.models import get_spec, list_specs
from vtdsl.models.builtins import builtin_config_dict
from vtdsl.models.families.gemma3 import with_pan_and_scan
from vtdsl.models.registry import spec_from_config

from plain_refs import first_error, flops_per_part, last_query_attention, plain_copy, top_rows

SPEC = get_spec("tiny-gemma3")
IMG, BOI, EOI, PAD = 250, 251, 252, 0
PER_VIEW, WINDOW = 16, 16  # 128-pixel views of 16x16 patches pooled 4x4; the sliding window


def _pan_and_scan_config(name: str) -> dict:
    config = builtin_config_dict(name)
    config["vtdsl_preprocessor"] = {**config["vtdsl_preprocessor"], "do_pan_and_scan": True}
    return config


# a 300x1000 image: pan-and-scan cuts 3 crops (ratio 3.3, 334-pixel crops), 4 views in all
PAS_SPEC = spec_from_config(_pan_and_scan_config("tiny-gemma3"), name="tiny-gemma3-pas").for_image(300, 1000)
VIEWS = 4


def _model(attn: str):
    """tiny-gemma3 (seed 0) with a random projector (transformers initialises it to zero,
    which would make every image token the same) and q norms scaled 8x ((1 + w) = 8):
    attention sharp enough for unambiguous reference rankings."""
    model = SPEC.build(device="cpu", attn_implementation=attn, seed=0).eval()
    with torch.no_grad():
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.copy_(torch.randn(proj.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(7.0)
    return model


@pytest.fixture(scope="module")
def models():
    return {attn: _model(attn) for attn in ("eager", "sdpa")}


def inputs(batch: int, views: int = 1, seed: int = 5, per_view: int = PER_VIEW) -> dict:
    """One image per prompt as Gemma 3's processor lays it out: each view's 16 tokens
    between `<start_of_image>` and `<end_of_image>`, text between views (pan-and-scan's
    "and here are some crops"); `token_type_ids` 1 on image tokens; batch 2 left-padded.
    `per_view`: placeholders per view (fewer: the prompt of a model pruned at vit.out)."""
    def prompt(text):
        body = [t for v in range(views) for t in ([30 + v] if v else []) + [BOI] + [IMG] * per_view + [EOI]]
        return [2] + text[:2] + body + text[2:]

    rows = [torch.tensor(prompt([5, 6, 8, 9, 10]))]
    if batch == 2:
        rows.append(torch.tensor(prompt([11, 12, 13, 14, 15, 16, 17, 18, 19, 20])))
    ids = pad_sequence(rows, batch_first=True, padding_value=PAD, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    px = torch.randn(len(rows) * views, 3, 128, 128, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px, token_type_ids=(ids == IMG).long())


# ---------------------------------------------------------------------------- spec
def _gemma3_4b_params() -> int:
    """google/gemma-3-4b-it's parameters from its architecture: SigLIP at 896 px (biases
    everywhere, learned positions for 64x64 patches, no pooling head), the projector's
    RMSNorm and 1152 x 2560 matrix, Gemma 3 text (q/k norms per head, four norms per
    layer, no biases) with tied embeddings."""
    d, ffn, n = 1152, 4304, 64 * 64
    block = 2 * 2 * d + 4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d)
    vision = (3 * 14 * 14 * d + d) + n * d + 27 * block + 2 * d
    h, q, kv, mlp, vocab = 2560, 8 * 256, 4 * 256, 10240, 262208
    layer = h * q + 2 * h * kv + q * h + 3 * h * mlp + 4 * h + 2 * 256
    return vision + d + d * h + vocab * h + 34 * layer + h


@pytest.mark.slow
def test_parameter_counts_equal_kerashubs_gemma3_4b_presets():
    """The published counts of keras-team/keras-hub @ 00d9f10a,
    keras_hub/src/models/gemma3/gemma3_presets.py: gemma3_instruct_4b (vision + text)
    4,299,915,632, gemma3_instruct_4b_text 3,880,099,328, medgemma_4b 4,300,079,472.
    KerasHub's Gemma 3 embeds 262,144 tokens, google/gemma-3-4b-it 262,208 (64 rows of
    2560 more; medgemma_4b, the same architecture, counts them). Checks the widths,
    depths, heads, patch grid and projector of the registered config, each part alone."""
    model = get_spec("gemma-3-4b").build(device="meta")
    extra_rows = (262208 - 262144) * 2560
    per_part = {}
    for name, p in model.named_parameters():
        part = "text" if ".language_model." in f".{name}" else "vision"
        per_part[part] = per_part.get(part, 0) + p.numel()
    assert per_part["text"] - extra_rows == 3_880_099_328
    assert sum(per_part.values()) - extra_rows == 4_299_915_632
    assert sum(per_part.values()) == 4_300_079_472


@pytest.mark.slow
def test_spec_from_the_published_config():
    s = get_spec("gemma-3-4b")
    assert (s.family, s.model_class, s.has_cls, s.spatial_merge, s.pan_and_scan) == (
        "gemma3", "Gemma3ForConditionalGeneration", False, 4, None)
    assert (s.vit.layers, s.vit.hidden, s.vit.ffn, s.vit.heads, s.vit.mlp) == (27, 1152, 4304, 16, "gelu")
    assert (s.llm.layers, s.llm.hidden, s.llm.heads, s.llm.kv_heads, s.llm.head_dim, s.llm.ffn, s.llm.mlp) == (
        34, 2560, 8, 4, 256, 10240, "swiglu")
    # one 896-pixel view: 64x64 patches, average-pooled 4x4 to 16x16 tokens
    assert (s.vit_tokens, s.image_tokens, s.projector, s.image_token_id) == (4096, 256, (1152, 2560), 262144)
    assert s.param_count() == _gemma3_4b_params() == 4_300_079_472  # the published 4.3 B
    assert s.tie_word_embeddings and family_of(s).name == "gemma3" and not family_of(s).sized_per_image
    assert s.for_image(300, 1000) is s  # pan-and-scan off: one view whatever the size
    assert (SPEC.image_tokens, PAS_SPEC.vit_crops, PAS_SPEC.image_tokens) == (PER_VIEW, VIEWS, VIEWS * PER_VIEW)


@pytest.mark.slow
def test_vtdsl_models_lists_both():
    from click.testing import CliRunner

    from vtdsl.cli import main

    assert {"gemma-3-4b", "tiny-gemma3"} <= {spec.name for spec in list_specs()}
    run = CliRunner().invoke(main, ["models"])
    assert run.exit_code == 0 and "gemma-3-4b" in run.output and "tiny-gemma3" in run.output


SIZES = [(100, 100), (896, 896), (500, 1000), (300, 1000), (1000, 300), (2000, 333), (333, 2000), (600, 5000),
         (256, 700), (700, 256), (255, 1000), (1000, 1300), (1000, 1250), (512, 2400),
         # pan-and-scan's edges: the 1.2 ratio, the 256-pixel crop floor, the half-up ratio
         (1000, 1199), (1000, 1200), (1200, 1000), (300, 511), (300, 512), (256, 513), (400, 1000), (400, 999),
         (3000, 700), (120, 2000)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-4b", "tiny-gemma3"])
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_visual_tokens_for_image_sizes_equal_the_processor(name, pan_and_scan):
    """The image tokens Gemma 3's processor writes for one image: its image processor's
    `num_crops` (the PIL backend: no torchvision) expanded by the processor's own
    `replace_image_token` (called on a stand-in: constructing the processor needs the
    checkpoint's tokenizer), with the processor's pan-and-scan defaults. With pan-and-scan
    on, both ways of turning it on count alike: the preprocessor saying so, and
    `--pan-and-scan` on the registered spec (`with_pan_and_scan`)."""
    from PIL import Image
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    config = _pan_and_scan_config(name) if pan_and_scan else builtin_config_dict(name)
    specs = [spec_from_config(config, name=name)] + ([with_pan_and_scan(get_spec(name))] if pan_and_scan else [])
    settings = {**Gemma3Processor.images_kwargs, "do_pan_and_scan": pan_and_scan}
    settings.pop("do_convert_rgb")
    side = config["vision_config"]["image_size"]
    processor = Gemma3ImageProcessorPil(size={"height": side, "width": side}, **settings)
    stand_in = SimpleNamespace(full_image_sequence="\n\n<boi>" + "<img>" * config["mm_tokens_per_image"] + "<eoi>\n\n")
    for height, width in SIZES:
        image = Image.fromarray(np.full((height, width, 3), 7, np.uint8))
        out = processor(images=[image], return_tensors="np")
        text = Gemma3Processor.replace_image_token(stand_in, {"num_crops": out["num_crops"]}, 0)
        for spec in specs:
            sized = spec.for_image(height, width)
            assert sized.image_tokens == text.count("<img>"), (name, pan_and_scan, height, width)
            assert sized.vit_crops == out["pixel_values"].shape[0]  # the views the tower encodes


def test_check_cli_counts_pan_and_scan_crops(tmp_path):
    """A local gemma-3-4b directory whose preprocessor turns pan-and-scan on: a 300x1000
    image is the original view and 3 crops, 4 x 256 tokens."""
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    config = builtin_config_dict("gemma-3-4b")
    pre = {**config.pop("vtdsl_preprocessor"), "do_pan_and_scan": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    policy = tmp_path / "p.vt"
    policy.write_text('policy "p"\nat llm.layer2 keep text top 50%\n')
    run = CliRunner().invoke(main, ["check", str(policy), "-m", str(tmp_path), "--image", "300x1000", "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert (out["visual_tokens_to_llm"], out["crops"], out["stages"][0]["tokens_out"]) == (1024, 4, 512)


@pytest.mark.parametrize("model, image, want", [
    ("gemma-3-4b", "300x1000", (1024, 4, 512)),  # the original view and 3 crops
    ("gemma-3-4b", "1000x1000", (256, 1, 128)),  # square: pan-and-scan cuts nothing
    ("gemma-3-4b", "600x5000", (1280, 5, 640)),  # ratio 8.3: the 4-crop ceiling
])
def test_check_cli_pan_and_scan_option_on_the_registered_model(tmp_path, model, image, want):
    """`vtdsl check --pan-and-scan` on the registered gemma-3-4b (its preprocessor leaves
    pan-and-scan off): the crops the processor cuts with do_pan_and_scan=True."""
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    policy = tmp_path / "p.vt"
    policy.write_text('policy "p"\nat llm.layer2 keep text top 50%\n')
    run = CliRunner().invoke(main, ["check", str(policy), "-m", model, "--image", image, "--pan-and-scan", "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert (out["visual_tokens_to_llm"], out["crops"], out["stages"][0]["tokens_out"]) == want


def test_check_cli_pan_and_scan_on_another_family_is_refused(tmp_path):
    from click.testing import CliRunner

    from vtdsl.cli import main

    policy = tmp_path / "p.vt"
    policy.write_text('policy "p"\nat llm.layer2 keep text top 50%\n')
    run = CliRunner().invoke(main, ["check", str(policy), "-m", "internvl3-8b", "--image", "300x1000",
                                    "--pan-and-scan"])
    assert run.exit_code == 2
    assert "has no pan-and-scan: only Gemma 3's processor cuts pan-and-scan crops" in run.output
    assert "Traceback" not in run.output


def test_a_hub_style_directory_gives_the_registered_spec(tmp_path):
    """google/gemma-3-4b-it's config.json layout as transformers 4.50 saved it (the text
    config names only what differs from Gemma3TextConfig's defaults, the global layers'
    scaling as `rope_scaling`) and its preprocessor_config.json (pan-and-scan null): the
    built-in's architecture and counts."""
    import json

    hub = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144, "eos_token_id": [1, 106],
        "torch_dtype": "bfloat16",
        "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896,
                          "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
                          "patch_size": 14, "vision_use_head": False},
    }
    (tmp_path / "config.json").write_text(json.dumps(hub))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma3ImageProcessor", "do_pan_and_scan": None, "image_seq_length": 256,
         "size": {"height": 896, "width": 896}}))
    local, builtin = get_spec(str(tmp_path)), get_spec("gemma-3-4b")
    fields = ("family", "vit", "llm", "projector", "vocab_size", "image_token_id", "dtype", "image_tokens",
              "spatial_merge", "merged_features", "pan_and_scan", "has_cls", "tie_word_embeddings",
              "vit_layer_path", "projector_path", "llm_layer_path")
    assert [getattr(local, f) for f in fields] == [getattr(builtin, f) for f in fields]
    text = local.config().text_config
    assert (text.layer_types.count("full_attention"), text.sliding_window) == (5, 1024)  # layers 5, 11, ..., 29
    assert text.rope_parameters["full_attention"]["factor"] == 8.0
    assert local.for_image(300, 1000).image_tokens == 256


# ---------------------------------------------------------------------------- cost
@pytest.mark.slow
def test_cost_of_gemma3_4b_equals_flop_counter_on_meta_part_by_part():
    """One 896-pixel image and 64 text tokens through the whole meta model, each part
    counted by FlopCounterMode, against the architecture's FLOPs by hand: FlopCounterMode
    counts every layer's attention over the whole sequence (a sliding window's mask
    changes no matmul), and neither the 4x4 average pool nor the norms."""
    spec = get_spec("gemma-3-4b")
    model = spec.build(device="meta", attn_implementation="eager")
    text = 64
    ids = torch.cat([torch.tensor([[2, 255999]]), torch.full((1, 256), 262144), torch.tensor([[256000]]),
                     torch.ones(1, text - 3, dtype=torch.long)], 1)
    px = torch.zeros(1, 3, 896, 896, device="meta", dtype=model.dtype)
    check_off = mock.patch("transformers.models.gemma3.modeling_gemma3.torch_compilable_check",
                           lambda *a, **k: None, create=True)
    with check_off, torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids.to("meta"), pixel_values=px, token_type_ids=(ids == 262144).long().to("meta"),
              logits_to_keep=1)
    d, ffn, n_vit, h, q, kv, mlp = 1152, 4304, 4096, 2560, 2048, 1024, 10240
    n_llm = 256 + text
    vit_layer = 2 * n_vit * (4 * d * d + 2 * d * ffn) + 4 * n_vit * n_vit * d
    llm_layer = 2 * n_llm * (2 * h * q + 2 * h * kv + 3 * h * mlp) + 4 * n_llm * n_llm * q
    want = {"vit": 2 * n_vit * 3 * 14 * 14 * d + 27 * vit_layer, "projector": 2 * 256 * d * h,
            "llm": 34 * llm_layer, "lm_head": 2 * h * 262208}
    assert flops_per_part(model, counter) == want and counter.get_total_flops() == sum(want.values())
    report = estimate_counts(spec, [n_vit] * 27, 256, [256] * 34, text).baseline
    assert {part: getattr(report, part) for part in want} == want


@pytest.mark.parametrize("src", [
    "at llm.layer2 keep text top 50%",
    "at llm.layer0 keep uniform 4; at llm.layer3 keep text top 2",
    "at vit.out keep knorm@vit.layer1 top 6; at llm.layer2 keep text top 3",
])
def test_compiled_flops_equal_the_cost_model(models, src):
    batch = inputs(1)
    text = int((batch["input_ids"] != IMG).sum())
    with vc.apply(src, models["eager"]), torch.no_grad(), FlopCounterMode(display=False) as counter:
        models["eager"](**batch)
    assert counter.get_total_flops() == estimate(check(src, SPEC), text_tokens=text, logits="all").flops


# ---------------------------------------------------------------------------- reference
def hand_masks(ids: torch.Tensor, am: torch.Tensor, pruned: torch.Tensor, *, bidirectional: bool = True):
    """Gemma 3's two masks written from its definition, ``{kind: [B, 1, n, n] bool}``: a
    row sees the non-padding, unpruned columns before it, and, if it is an image token,
    every token of its own image block (a run of image tokens; `bidirectional` False
    leaves blocks causal); sliding layers also only columns less than WINDOW positions
    back. A padding row sees itself (so that it stays finite)."""
    n = ids.shape[1]
    row, col = torch.arange(n)[:, None], torch.arange(n)[None]
    img = ids == IMG
    starts = img & ~torch.cat([torch.zeros_like(img[:, :1]), img[:, :-1]], 1)
    block = torch.where(img, starts.cumsum(1), -1)
    same = img[:, :, None] & (block[:, :, None] == block[:, None, :]) & bidirectional
    seen = ((col <= row)[None] | same) & am.bool()[:, None, :] & ~pruned[:, None, :]
    eye = torch.eye(n, dtype=torch.bool)[None]
    sliding = seen & (row - col < WINDOW)
    return {"full_attention": (seen | eye)[:, None], "sliding_attention": (sliding | eye)[:, None]}


def _masked_forward(ref, batch: dict, ids, am, stages: dict[int, list[torch.Tensor]], bidirectional: bool = True,
                    renumber: int | None = None, **kwargs):
    """One forward of the plain model on `ids` whose LLM layers get `hand_masks`, the
    positions `stages[k][b]` of sample b masked from layer k on; positions unchanged, or,
    from layer `renumber` on, each row's position less the rows pruned before it (that
    layer's (cos, sin) made by the model's rotary embedding for the layer's kind)."""
    kinds = ref.config.text_config.layer_types
    eager = ref.config.text_config._attn_implementation == "eager"
    text_model = ref.model.language_model
    pid = (am.cumsum(1) - 1).clamp(min=0)
    inputs = []
    for j in range(len(text_model.layers)):
        pruned = torch.zeros_like(ids, dtype=torch.bool)
        for k, rows_per_sample in stages.items():
            for b, rows in enumerate(rows_per_sample):
                pruned[b, rows] |= j >= k
        mask = hand_masks(ids, am, pruned, bidirectional=bidirectional)[kinds[j]]
        step = {"attention_mask": torch.where(mask, 0.0, torch.finfo(torch.float32).min) if eager else mask}
        if renumber is not None and j >= renumber:
            shifted = pid - pruned.cumsum(1)
            step["position_embeddings"] = text_model.rotary_emb(torch.zeros(1), shifted, kinds[j])
        inputs.append(step)
    hooks = [layer.register_forward_pre_hook(lambda m, a, k, j=j: (a, {**k, **inputs[j]}), with_kwargs=True)
             for j, layer in enumerate(text_model.layers)]
    try:
        with torch.no_grad():
            return ref(input_ids=ids, attention_mask=am, pixel_values=batch["pixel_values"],
                       token_type_ids=(ids == IMG).long(), position_ids=pid, use_cache=False, **kwargs)
    finally:
        for h in hooks:
            h.remove()


def reference_generate(ref, batch: dict, stages: dict[int, list[torch.Tensor]], new_tokens: int,
                       bidirectional: bool = True, renumber: int | None = None):
    """Greedy decoding of the plain model without a cache, every step a `_masked_forward`
    (what pruning `stages` means). Returns the prompt with the new tokens, and the first
    step's last-row logits."""
    ids, am, first = batch["input_ids"], batch["attention_mask"], None
    for _ in range(new_tokens):
        logits = _masked_forward(ref, batch, ids, am, stages, bidirectional, renumber).logits[:, -1]
        first = logits if first is None else first
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
    return ids, first


def top_text(ref, batch: dict, layer: int, group: int, keep: int):
    """`keep text top` by hand: the last prompt row's head-mean attention at `layer - 1`
    (the plain model's own eager attention), the top `keep` image positions of every
    `group` consecutive ones kept. Returns (kept [B, ...], pruned per sample)."""
    att = last_query_attention(ref, batch, layer - 1)
    kept, pruned = [], []
    for b, ids in enumerate(batch["input_ids"]):
        rows = (ids == IMG).nonzero().flatten()
        chosen = torch.cat([top_rows(att[b], part, keep) for part in rows.split(group)])
        kept.append(chosen)
        pruned.append(rows[~torch.isin(rows, chosen)])
    return torch.stack(kept), pruned


# ---------------------------------------------------------------------------- LLM stages
def _assert_top_text_matches(model, attn: str, batch: dict, src: str, group: int, keep: int, spec=SPEC,
                             renumber: int | None = None):
    """`src` (a `keep text top` at llm.layer2) keeps what `top_text` keeps of each `group`
    and generates what the masked reference does; returns the reference's tokens."""
    kept, pruned = top_text(plain_copy(SPEC, model, "eager"), batch, layer=2, group=group, keep=keep)
    want, _ = reference_generate(plain_copy(SPEC, model, attn), batch, {2: pruned}, new_tokens=6, renumber=renumber)
    with vc.apply(src, model, spec=spec):
        with torch.no_grad():
            got = model.generate(**batch, max_new_tokens=6, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"].reshape(2, -1), kept)
    assert torch.equal(got, want)
    return want


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llm_stage_generate_matches_masked_reference(models, attn):
    """Batch 2, left-padded, prompts longer than the sliding window (the sliding layers'
    caches drop rows while decoding): `top 50%` at llm.layer2 keeps 8 of 16."""
    batch = inputs(2)
    assert batch["input_ids"].shape[1] + 6 > 2 * WINDOW
    _assert_top_text_matches(models[attn], attn, batch, "at llm.layer2 keep text top 50%", PER_VIEW, PER_VIEW // 2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llm_layer0_and_a_later_stage_match_the_masked_reference(models, attn):
    """A stage before the LLM (the masks `Gemma3Model` builds before its LLM, gathered per
    layer kind) and one at llm.layer2 on what is left, scored on the masked attention of
    the global layer 1 (from the last row the sliding layers see none of the early image
    tokens)."""
    model, batch = models[attn], inputs(2)
    with vc.apply("at llm.layer0 keep uniform 4; at llm.layer2 keep text top 2", model):
        with torch.no_grad():
            got = model.generate(**batch, max_new_tokens=6, do_sample=False)
        kept = vc.kept_tokens(model)
    rows = [(ids == IMG).nonzero().flatten() for ids in batch["input_ids"]]
    uniform = [r[[i * PER_VIEW // 4 for i in range(4)]] for r in rows]
    assert torch.equal(kept["llm.layer0#0"].reshape(2, -1), torch.stack(uniform))
    first = [r[~torch.isin(r, u)] for r, u in zip(rows, uniform)]
    eager_ref = plain_copy(SPEC, model, "eager")
    att = _masked_forward(eager_ref, batch, batch["input_ids"], batch["attention_mask"], {0: first},
                          output_attentions=True).attentions[1][:, :, -1].mean(1)
    second = [top_rows(att[b], uniform[b], 2) for b in range(2)]
    assert torch.equal(kept["llm.layer2#1"].reshape(2, -1), torch.stack(second))
    later = [u[~torch.isin(u, s)] for u, s in zip(uniform, second)]
    want, _ = reference_generate(plain_copy(SPEC, model, attn), batch, {0: first, 2: later}, new_tokens=6)
    assert torch.equal(got, want)


def test_kept_image_tokens_still_attend_to_each_other_both_ways(models):
    """After `top 50%` at llm.layer2, the masks layers 2 (sliding) and 3 (global) get let
    every kept image token see every other kept one, later ones included, while a text
    row before the image sees none of them; and the compiled prefill's last-row logits are
    the hand-masked reference's with bidirectional blocks, not those of causal blocks."""
    model, batch = models["eager"], inputs(2)
    layers = model.model.language_model.layers
    seen: dict[int, torch.Tensor] = {}
    with vc.apply("at llm.layer2 keep text top 50%", model):
        hooks = [layers[j].register_forward_pre_hook(
            lambda m, a, k, j=j: seen.__setitem__(j, k["attention_mask"]), with_kwargs=True) for j in (2, 3)]
        try:
            with torch.no_grad():
                logits = model(**batch).logits[:, -1]
        finally:
            for h in hooks:
                h.remove()
        kept = vc.kept_tokens(model)["llm.layer2#0"].reshape(2, -1)
    n = batch["input_ids"].shape[1]
    for b, ids in enumerate(batch["input_ids"]):
        image = (ids == IMG).nonzero().flatten()
        survivors = torch.tensor([p for p in range(n) if p not in set(image.tolist()) - set(kept[b].tolist())])
        rows = torch.searchsorted(survivors, kept[b])  # the kept image tokens' rows after the prune
        before = torch.searchsorted(survivors, image[0]) - 2  # the text row before <start_of_image>
        for j, mask in seen.items():
            allowed = mask[b, 0] == 0
            assert allowed[rows][:, rows].all(), (b, j)
            assert not allowed[before, rows].any() and allowed[rows[-1], before], (b, j)
    ref = plain_copy(SPEC, model, "eager")
    _, pruned = top_text(ref, batch, layer=2, group=PER_VIEW, keep=PER_VIEW // 2)
    _, both_ways = reference_generate(ref, batch, {2: pruned}, new_tokens=1)
    _, causal = reference_generate(ref, batch, {2: pruned}, new_tokens=1, bidirectional=False)
    assert torch.allclose(logits, both_ways, atol=1e-5)
    assert (logits - causal).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pan_and_scan_views_are_pruned_together(models, attn):
    """On the spec sized for a 300x1000 image with pan-and-scan (the original view and 3
    crops, each its own block between text tokens, 64 tokens), `top 25%` at llm.layer2
    keeps 16 of the image's 64 across its views, as the masked reference does."""
    _assert_top_text_matches(models[attn], attn, inputs(2, views=VIEWS), "at llm.layer2 keep text top 25%",
                             VIEWS * PER_VIEW, VIEWS * PER_VIEW // 4, spec=PAS_SPEC)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_renumber_inside_the_llm_uses_each_layer_kinds_rotary_base(models, attn):
    """`renumber` at llm.layer2: from there on every kept row takes its position less the
    rows pruned before it, in the sliding layers' local base and the global layers' own,
    while decoding too."""
    model, batch = models[attn], inputs(2)
    want = _assert_top_text_matches(model, attn, batch, "at llm.layer2 keep text top 50% renumber", PER_VIEW,
                                    PER_VIEW // 2, renumber=2)
    _, pruned = top_text(plain_copy(SPEC, model, "eager"), batch, layer=2, group=PER_VIEW, keep=PER_VIEW // 2)
    kept_positions, _ = reference_generate(plain_copy(SPEC, model, attn), batch, {2: pruned}, new_tokens=6)
    assert not torch.equal(want, kept_positions)  # the re-numbered positions change the tokens


def test_decode_time_selection_is_refused_for_the_sliding_caches(models):
    """`during decode ... attend top K` picks cache rows by prompt index; a sliding-window
    layer's cache drops its oldest rows, so the family refuses it, saying so."""
    with pytest.raises(vc.CompileError, match="sliding-window layers keep only their last 16 cache rows"):
        vc.compile("during decode at llm.layer2 attend top 8", models["eager"])
    assert vc.compiled(models["eager"]) is None


# ---------------------------------------------------------------------------- ViT stages
def _plain_pooled_norms(model, px: torch.Tensor, layer: int) -> torch.Tensor:
    """`norm@vit.layer{layer}` summed over each pooled group, by hand: the plain tower's
    hidden states after layer `layer`, each patch's L2 norm, summed over the 4x4 patches
    the projector's pool averages, in raster order on the 4x4 pooled grid ``[B, 16]``."""
    with torch.no_grad():
        h = model.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states[layer + 1]
    side = SPEC.image_size // SPEC.patch_size
    return h.norm(dim=-1).reshape(-1, side // 4, 4, side // 4, 4).sum((2, 4)).reshape(-1, (side // 4) ** 2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vit_out_stage_keeps_pooled_tokens_as_a_plain_loop(models, attn):
    """`at vit.out keep norm@vit.layer1 top 6` keeps the 6 pooled tokens whose 4x4 patches
    have the largest summed hidden-state norms; the LLM then sees 6 image tokens, still
    one bidirectional block (`token_type_ids` remade for the shortened prompt). Batch 2,
    left-padded: the greedy tokens equal the hand-masked reference on a 6-placeholder
    prompt whose projector output is replaced by the plain model's kept features."""
    model, keep, batch = models[attn], 6, inputs(2)
    ref = plain_copy(SPEC, model, attn)
    px = batch["pixel_values"]
    scores = _plain_pooled_norms(ref, px, layer=1)
    kept = torch.stack([top_rows(row, torch.arange(row.shape[0]), keep) for row in scores])
    with torch.no_grad():
        pooled = ref.model.multi_modal_projector(ref.model.vision_tower(pixel_values=px).last_hidden_state)
    features = pooled.gather(1, kept[..., None].expand(-1, -1, pooled.shape[-1]))
    short = {**inputs(2, per_view=keep), "pixel_values": px}
    hook = ref.model.multi_modal_projector.register_forward_hook(lambda m, a, out: features)
    try:
        want, _ = reference_generate(ref, short, {}, new_tokens=6)
    finally:
        hook.remove()
    with vc.apply(f"at vit.out keep norm@vit.layer1 top {keep}", model):
        with torch.no_grad():
            got = model.generate(**batch, max_new_tokens=6, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["vit.out#0"], kept + 1)  # identities count from 1
    # generate hands back the caller's prompt (16 placeholders), then the new tokens
    assert torch.equal(got[:, :batch["input_ids"].shape[1]], batch["input_ids"])
    assert torch.equal(got[:, -6:], want[:, -6:])


# ---------------------------------------------------------------------------- check time
@pytest.mark.parametrize("src, at, code, words", [
    ("at llm.layer2 keep cls@vit.layer1 top 8", "cls@", "no-cls", "has no CLS token"),
    ("at vit.out keep cls_token + random 8", "cls_token", "cls-token", "has no CLS token"),
    ("at llm.layer2 keep knorm@vit.layer1 top 8", "knorm@", "model-layout", "summed over each shuffled or pooled 4x4 group"),
])
def test_vit_side_refusals_are_located_and_say_why(src, at, code, words):
    d = first_error(src, SPEC)
    assert (d.span.line, d.span.column, d.code, words in d.message) == (1, src.index(at) + 1, code, True), d
