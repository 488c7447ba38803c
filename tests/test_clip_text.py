"""`clip_text`: Recoverable Compression's text score with an auxiliary CLIP text tower.

The hand computation reads the plain tiny-llava (its ViT's layer-23 output) and the tiny
CLIP directly through transformers (text model, text_projection, visual_projection), as
RC's get_score_by_text does (banjiuyufen/Recoverable-Compression @ d9275944,
clip_encoder.py lines 82-100 and 166-188)."""

from __future__ import annotations

import torch
import pytest
from click.testing import CliRunner

import vtdsl.compiler as vc
from vtdsl.cli import main
from vtdsl.compiler.text_encoder import TextEncoder
from vtdsl.ir import check
from vtdsl.lang import PolicyError
from vtdsl.models import get_spec

from tiny_clip import MAX_LENGTH, tiny_clip

SPEC = get_spec("tiny-llava")
HEAD = 'policy "t"\nmodel "tiny-llava"\n'
QUESTIONS = ["What colour is the bus?", "Is there a dog on the left?"]


@pytest.fixture(scope="module")
def model():
    return SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()


def _inputs(batch: int):
    ids = torch.tensor([[5, 6, 7] + [SPEC.image_token_id] * 576 + [8, 9]] * batch)
    return ids, torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(4))


def hand_scores(model, px, questions) -> torch.Tensor:
    """RC's text score of each patch, ``[B, 576]``."""
    _, clip, tokenizer = tiny_clip()
    ids = tokenizer(questions, max_length=MAX_LENGTH, truncation=True, padding="max_length",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text = clip.text_projection(clip.text_model(ids).last_hidden_state[:, -1, :])
        last = model.model.vision_tower(px, output_hidden_states=True).hidden_states[24][:, 1:]
        image = clip.visual_projection(last)
    text, image = torch.nn.functional.normalize(text, dim=-1), torch.nn.functional.normalize(image, dim=-1)
    return torch.einsum("bd,bnd->bn", text, image) * image.shape[-1] ** -0.5


def _kept(model, policy, px, ids, questions):
    encoder = TextEncoder.load(tiny_clip()[0])
    encoder.ask(questions)
    with vc.apply(HEAD + policy, model, text_encoder=encoder), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        return vc.kept_tokens(model)


def test_vit_out_keeps_the_top_patches_by_hand(model):
    ids, px = _inputs(2)
    kept = _kept(model, "at vit.out keep clip_text@vit.layer23 top 32\n", px, ids, QUESTIONS)
    want = hand_scores(model, px, QUESTIONS).topk(32, dim=1).indices.sort(1).values + 1  # vid = patch + 1
    assert torch.equal(kept["vit.out#0"], want)
    # one question for the batch is every image's question
    same = _kept(model, "at vit.out keep clip_text@vit.layer23 top 32\n", px, ids, QUESTIONS[0])
    want0 = hand_scores(model, px, QUESTIONS[:1] * 2).topk(32, dim=1).indices.sort(1).values + 1
    assert torch.equal(same["vit.out#0"], want0) and not torch.equal(want0, want)


def test_inside_the_vit_it_reads_the_layer_named(model):
    ids, px = _inputs(1)
    kept = _kept(model, "at vit.layer12 keep clip_text@vit.layer11 top 100\n", px, ids, QUESTIONS[:1])
    _, clip, tokenizer = tiny_clip()
    tok = tokenizer(QUESTIONS[:1], max_length=MAX_LENGTH, truncation=True, padding="max_length",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text = clip.text_projection(clip.text_model(tok).last_hidden_state[:, -1, :])
        h = model.model.vision_tower(px, output_hidden_states=True).hidden_states[12][:, 1:]
        s = torch.nn.functional.cosine_similarity(clip.visual_projection(h), text[:, None, :], dim=-1)
    assert torch.equal(kept["vit.layer12#0"][0], s.topk(100, dim=1).indices.sort(1).values[0] + 1)


def test_refused_without_a_text_encoder_at_the_score(model):
    with pytest.raises(vc.CompileError, match=r"line 3, column 17: 'clip_text' .* no CLIP text tower"):
        with vc.apply(HEAD + "at vit.out keep clip_text@vit.layer23 top 32\n", model):
            pass
    with pytest.raises(PolicyError) as e:
        check("at llm.layer2 keep clip_text top 32", "tiny-llava")
    assert "'clip_text' compares the vision tower's patches with the question" in str(e.value)


def test_asking_nothing_or_too_many_questions_is_an_error(model):
    ids, px = _inputs(1)
    encoder = TextEncoder.load(tiny_clip()[0])
    with vc.apply(HEAD + "at vit.out keep clip_text@vit.layer23 top 32\n", model, text_encoder=encoder):
        with pytest.raises(vc.CompileError, match="has no question"):
            model(input_ids=ids, pixel_values=px)
        encoder.ask(QUESTIONS + QUESTIONS[:1])
        with pytest.raises(vc.CompileError, match="asked 3 questions for 1 images"):
            model(input_ids=ids, pixel_values=px)


def test_a_directory_without_a_clip_is_one_line():
    with pytest.raises(vc.CompileError, match="no config.json"):
        TextEncoder.load("/nonexistent-clip")


@pytest.mark.slow
def test_vtdsl_run_with_and_without_text_encoder(tmp_path):
    from vtdsl.eval.bench import generate

    ex = generate("val", 1)[0]
    image = tmp_path / "scene.png"
    ex.image.save(image)
    policy = tmp_path / "rc.vt"
    policy.write_text('policy "rc"\nat vit.out keep cls top 20% by lof(10) + clip_text@vit.layer4 top 20% by lof(10)\n')
    args = ["run", str(policy), "--image", str(image), "--question", ex.question]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2
    assert f"{policy}:2:42: error: 'clip_text' compares the patches" in refused.output
    assert "Traceback" not in refused.output
    clip_dir = tiny_clip(width=96)[0]  # the shipped vtbench model's ViT width
    ok = CliRunner().invoke(main, args + ["--text-encoder", str(clip_dir), "--json"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, args + ["--text-encoder", str(tmp_path)])
    assert bad.exit_code == 2 and "no config.json" in bad.output and "Traceback" not in bad.output


def test_vtdsl_compile_lists_the_policy_with_a_text_encoder_and_refuses_it_without(tmp_path):
    policy = "policies/recoverable.vt"
    refused = CliRunner().invoke(main, ["compile", policy, "--model", "tiny-llava"])
    assert refused.exit_code == 2 and f"{policy}:32:61: error: 'clip_text' compares the patches" in refused.output
    ok = CliRunner().invoke(main, ["compile", policy, "--model", "tiny-llava", "--text-encoder", str(tiny_clip()[0])])
    assert ok.exit_code == 0, ok.output
