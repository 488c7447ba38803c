"""The vtbench v2 training recipe (vtdsl/eval/train2.py) on a shrunken model: the loss
falls, token dropping keeps or renumbers positions as planned, and a resumed run
continues exactly as the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from vtdsl.eval import bench2
from vtdsl.eval import train2 as t2

TINY = {"text_hidden_size": 32, "text_intermediate_size": 64, "text_num_hidden_layers": 2,
        "text_num_attention_heads": 4, "text_num_key_value_heads": 2, "vision_hidden_size": 16,
        "vision_intermediate_size": 32, "vision_num_hidden_layers": 2, "vision_num_attention_heads": 2}


def _cfg(tmp_path, **kw):
    base = dict(vit_steps=2, steps=6, batch_size=2, questions=3, vit_batch_size=4, lr=3e-3, warmup=1, threads=1,
                eval_every=10**6, val_n=2, chunk=8, pool=2, ckpt_every=4, out=str(tmp_path / "run"), model=TINY,
                attn_layer=1)
    return t2.TrainConfig(**{**base, **kw})


def test_tokenizer_and_processor_match_the_registered_model():
    from vtdsl.models import get_spec

    tok = t2.build_tokenizer()
    spec = get_spec("tiny-llava-vtbench2")
    assert len(tok) <= spec.config().text_config.vocab_size
    assert tok.convert_tokens_to_ids("<image>") == spec.image_token_id
    ex = bench2.make_example("val", 5)  # a locate question: a hyphenated answer is one token
    assert tok.convert_ids_to_tokens(tok("top-left", add_special_tokens=False)["input_ids"]) == ["top-left"]
    proc = t2.build_processor(tok)
    ids = proc(images=[ex.image], text=[f"USER: <image>\n{ex.question} ASSISTANT:"], return_tensors="pt")
    assert int((ids["input_ids"] == spec.image_token_id).sum()) == 576
    assert tuple(ids["pixel_values"].shape) == (1, 3, 192, 192)


def test_token_plan_and_positions():
    cfg = t2.TrainConfig(drop_prob=1.0, min_keep=0.25, renumber_prob=0.0)
    idx, renumber = t2.token_plan(cfg, 7, 2, 576)
    again, _ = t2.token_plan(cfg, 7, 2, 576)
    assert torch.equal(idx, again) and not renumber  # a pure function of (seed, step)
    k = idx.shape[1]
    assert 144 <= k <= 576 and all(torch.equal(row, row.sort().values) for row in idx)
    tok = t2.build_tokenizer()
    qa = [[("Is there a red circle?", "yes")], [("Where is the red circle?", "top")]]
    kept = t2.packed_inputs(tok, qa, idx, False, 576)
    s = kept["image_start"]
    assert torch.equal(kept["position_ids"][0, s:s + k], s + idx[0])  # original positions
    assert kept["position_ids"][0, s + k].item() == s + 576  # the newline follows the whole grid
    renum = t2.packed_inputs(tok, qa, idx, True, 576)
    assert torch.equal(renum["position_ids"][0, s:s + k], torch.arange(s, s + k))
    assert renum["position_ids"][0, s + k].item() == s + k
    assert tok.convert_ids_to_tokens(kept["labels"].tolist()) == ["yes", "top"]
    assert not t2.token_plan(t2.TrainConfig(drop_prob=0.0), 7, 2, 576)[1]


def test_asked_patches_cover_the_objects_that_hold_the_answer():
    objects = [
        {"type": "shape", "shape": "circle", "color": "red", "size": "small", "box": [8, 16, 20, 28]},
        {"type": "shape", "shape": "square", "color": "blue", "size": "medium", "box": [100, 100, 120, 116]},
        {"type": "shape", "shape": "circle", "color": "blue", "size": "small", "box": [180, 0, 192, 8]},
        {"type": "sign", "char": "K", "color": "green", "box": [64, 64, 72, 72]},
    ]
    meta = {"objects": objects}

    def cells(question, answer="yes"):
        return {(int(i) // 24, int(i) % 24) for i in t2.asked_patches(meta, question, answer).nonzero()}

    red_circle = {(2, 1), (2, 2), (3, 1), (3, 2)}  # x 8..19 -> columns 1-2, y 16..27 -> rows 2-3
    blue_square = {(r, c) for r in (12, 13, 14) for c in (12, 13, 14)}  # 100..119 / 100..115
    blue_circle = {(0, 22), (0, 23)}
    assert cells("Is there a red circle?") == cells("Where is the red circle?") == red_circle
    assert cells("What size is the blue square?") == blue_square
    assert cells("What color is the square?") == blue_square
    assert cells("How many circles are there?", "two") == red_circle | blue_circle
    assert cells("How many blue shapes are there?", "two") == blue_square | blue_circle
    assert cells("Is the red circle above the blue square?") == red_circle | blue_square
    assert cells("What is written on the green sign?", "k") == {(8, 8)}
    assert cells("Which color is most common?", "blue") == blue_square | blue_circle
    assert cells("Is there a green cross?", "no") == cells("What pattern is the background?", "dots") == set()


def test_align_loss_pulls_patches_towards_the_words_naming_them():
    tok = t2.build_tokenizer()
    words = t2.class_words(tok)
    red_circle, sign_k = t2.PATCH_CLASSES.index("red circle"), t2.PATCH_CLASSES.index("sign K")
    assert tok.convert_ids_to_tokens(words[red_circle].tolist()) == ["red", "circle"]
    assert tok.convert_ids_to_tokens(words[sign_k].tolist()) == ["sign", "k"]
    embed = torch.randn(len(tok), 6, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    labels[0, 0] = torch.tensor([0, red_circle, sign_k])  # background, a red circle, a sign
    scene = torch.zeros(1, 5)
    scene[0, -1] = bench2.PATTERNS.index("dots")
    projected = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(1))
    ids = tok.convert_tokens_to_ids
    targets = [embed[ids("dots")], (embed[ids("red")] + embed[ids("circle")]) / 2,
               (embed[ids("sign")] + embed[ids("k")]) / 2]
    want = sum(1 - float(projected[0, i] @ t / (projected[0, i].norm() * t.norm())) for i, t in enumerate(targets)) / 3
    got = t2.Heads(4).align_loss(projected, labels, scene, embed, words)
    assert abs(float(got) - want) < 1e-6


def test_attention_guide_loss_is_the_layers_own_attention_mass():
    # eager attention's weights, with the packed mask as an additive float mask (eager
    # adds a boolean mask as numbers), are the reference
    tiny = {**TINY, "text_num_hidden_layers": 3}
    model = t2.build_model(0, **tiny)
    model.model.language_model.config._attn_implementation = "eager"
    tok = t2.build_tokenizer()
    idx, renumber = t2.token_plan(t2.TrainConfig(drop_prob=1.0, min_keep=0.3, renumber_prob=0.0), 3, 2, 576)
    qa = [[("Is there a red circle?", "yes"), ("Where is the blue square?", "top")],
          [("What color is the cross?", "red")]]
    batch = t2.packed_inputs(tok, qa, idx, renumber, 576)
    embeds = torch.randn(*batch["input_ids"].shape, tiny["text_hidden_size"], generator=torch.Generator().manual_seed(0))
    attn, seen = model.model.language_model.layers[1].self_attn, {}
    hook = attn.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    additive = torch.zeros(batch["attention_mask"].shape).masked_fill(~batch["attention_mask"], float("-inf"))
    with torch.no_grad():
        weights = model.model.language_model(inputs_embeds=embeds, attention_mask=additive, use_cache=False,
                                             position_ids=batch["position_ids"], output_attentions=True).attentions[1]
        hook.remove()
        rows = batch["label_index"]
        target = torch.rand(len(rows), embeds.shape[1], generator=torch.Generator().manual_seed(1)) < 0.1
        target[1] = False  # a row without a target does not count
        got = t2.attention_guide_loss(attn, seen["hidden_states"], seen["position_embeddings"],
                                      batch["attention_mask"], rows, target, 3)
    mass = (weights[rows[:, 0], :3, rows[:, 1]] * target[:, None]).sum(-1)  # (rows, heads 0..2)
    torch.testing.assert_close(got, -mass[[0, 2]].log().mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~30 s: a few steps at 576 visual tokens, twice
def test_loss_falls_and_resume_continues_identically(tmp_path):
    torch.set_num_threads(1)
    straight = t2.Session(_cfg(tmp_path / "a", drop_prob=0.0, steps=12, lr=1e-2))
    losses = []
    straight.model.train()
    while straight.step < straight.total:
        step = straight.vision_step() if straight.step < 2 else straight.full_step()
        straight.step += 1
        if "answer" in step:
            losses.append(step["answer"])
    assert losses[-1] < 0.7 * losses[0], losses  # one batch seen again and again: it is learnt

    cfg = _cfg(tmp_path / "b", drop_prob=0.9, renumber_prob=0.5)
    # after the checkpoint at step 4: kept subsets with renumbered and with own positions
    plans = [t2.token_plan(cfg, s, 2, 576) for s in range(4, 8)]
    assert {r for _, r in plans} == {True, False} and min(i.shape[1] for i, _ in plans) < 576
    whole = t2.Session(cfg)
    whole.run()
    part = t2.Session(_cfg(tmp_path / "c", drop_prob=0.9, renumber_prob=0.5))
    part.run(stop_after=4)  # a checkpoint at step 4, then "interrupted"
    resumed = t2.Session(_cfg(tmp_path / "c", drop_prob=0.9, renumber_prob=0.5, resume=True))
    assert resumed.step == 4
    resumed.run()
    assert resumed.step == whole.step == cfg.vit_steps + cfg.steps
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow  # ~15 s: the one command end to end on the shrunken model
def test_one_command_trains_evaluates_and_exports(tmp_path):
    import json

    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    out, export = tmp_path / "run", tmp_path / "export"
    args = ["--vit-steps", "1", "--steps", "2", "--batch-size", "2", "--questions", "2", "--vit-batch-size", "2",
            "--val-n", "2", "--final-n", "3", "--chunk", "8", "--pool", "2", "--threads", "1", "--out", str(out),
            "--export", str(export), "--attn-layer", "1"] + [a for k, v in TINY.items() for a in ("--model", f"{k}={v}")]
    assert t2.main(args) == 0
    record = json.loads((export / "training.json").read_text())
    assert record["steps"] == 3 and record["device"] == "cpu" and record["final"]["test"]["n"] == 3
    assert record["command"].startswith("python examples/train_tiny_vlm2.py --vit-steps 1")
    model = LlavaForConditionalGeneration.from_pretrained(export, local_files_only=True)
    assert model.config.text_config.num_hidden_layers == 2 and model.config.image_seq_length == 576
    assert LlavaProcessor.from_pretrained(export).tokenizer.convert_tokens_to_ids("<image>") == 4
    assert (out / "checkpoint.pt").is_file()
