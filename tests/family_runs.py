"""The compiled side of the model-family tests: a policy's prefill FLOPs and greedy
generation under `vtdsl.compiler.apply`, the anyres families' inputs (LLaVA-NeXT,
LLaVA-OneVision) and their ViT-stage runs next to the plain model fed the reference
features. Unlike `plain_refs`, this module uses the compiler."""

from __future__ import annotations

import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check

from torch.utils.flop_counter import FlopCounterMode

from plain_refs import (clip_crop_features, decode_reference, generate_on_features, last_query_attention, left_padded,
                        masked_generate, top_k_reference, top_rows)


def compiled_prefill_flops(model, src: str, batch_inputs: dict) -> int:
    """FlopCounterMode's total for one forward of `model` compiled with `src`."""
    with vc.apply(src, model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch_inputs)
    return counter.get_total_flops()


def qwen_prefill_parts(model, src: str, batch_inputs: dict) -> dict:
    """FlopCounterMode of a Qwen-VL model's compiled prefill by part: the vision tower less
    its merger (scores and DeepStack mergers included), the merger, the LLM, lm_head."""
    with vc.apply(src, model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch_inputs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    top = type(model).__name__
    tower = f"{top}.model.visual"
    return {"vit": counts[tower] - counts[f"{tower}.merger"], "projector": counts[f"{tower}.merger"],
            "llm": counts[f"{top}.model.language_model"], "lm_head": counts[f"{top}.lm_head"]}


def compiled_generate(model, src: str, batch_inputs: dict, stage: str, new_tokens: int):
    """Greedy tokens of `model` compiled with `src`, and the positions `stage` kept."""
    with vc.apply(src, model):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=new_tokens, do_sample=False)
        return got, vc.kept_tokens(model)[stage]


def assert_fastv_matches_masked_reference(model, reference, batch_inputs: dict, image_token_id: int,
                                          image_tokens: int, new_tokens: int = 6) -> None:
    """`keep text top 50%` at llm.layer2 keeps the positions and greedy tokens of the plain
    masked reference run on `reference` (an uncompiled copy of `model`)."""
    kept, want = top_k_reference(reference, batch_inputs, image_token_id, image_tokens // 2, layer=2,
                                 new_tokens=new_tokens)
    got, kept_got = compiled_generate(model, "at llm.layer2 keep text top 50%", batch_inputs, "llm.layer2#0",
                                      new_tokens)
    assert torch.equal(kept_got, kept), (kept_got, kept)
    assert torch.equal(got, want), (got, want)


def anyres_inputs(spec, size: tuple[int, int], batch: int, seed: int):
    """Anyres inputs (LLaVA-NeXT, LLaVA-OneVision): one image of `size` per prompt, as many
    placeholders as `spec.for_image(size)` counts, random crops; batch 2 is left-padded."""
    sized = spec.for_image(*size)
    rows = [[5, 6, 7] + [spec.image_token_id] * sized.image_tokens + [8, 9, 10]]
    if batch == 2:
        rows.append([11, 12, 13, 14, 15] + [spec.image_token_id] * sized.image_tokens + [18, 19, 20, 21])
    ids, mask = left_padded(rows)
    px = torch.randn(len(rows), sized.vit_crops, 3, spec.image_size, spec.image_size,
                     generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=torch.tensor([list(size)] * len(rows)))


def compiled_anyres_vit_run(model, batch_inputs: dict, src: str, kept: int, new_tokens: int = 5):
    """Under the compiled `src` (a ViT stage keeping `kept` tokens per image): the image
    features ``[B, kept, d]`` and the greedy tokens of `generate` (prompt included)."""
    with vc.apply(src, model):
        assert vc.image_token_count(model) == kept
        with torch.no_grad():
            got = model.model.get_image_features(pixel_values=batch_inputs["pixel_values"],
                                                 image_sizes=batch_inputs["image_sizes"]).pooler_output
            gen = model.generate(**batch_inputs, max_new_tokens=new_tokens, do_sample=False)
    return torch.stack(list(got)), gen


def generate_on_fewer_placeholders(ref, batch_inputs: dict, image_token_id: int, features, new_tokens: int = 5):
    """The plain model on the prompt with its placeholders cut to `features`' count per
    image (vtdsl's own input rewrite, whose count the caller checks) and their embeddings
    replaced by `features`: the new tokens."""
    ids = batch_inputs["input_ids"]
    short = vc.rewrite_inputs(ids, batch_inputs["attention_mask"], image_token_id=image_token_id,
                              from_count=int((ids[0] == image_token_id).sum()), to_count=features.shape[1])
    return generate_on_features(ref, short["input_ids"], short["attention_mask"], image_token_id, features,
                                new_tokens)


def assert_flops_equal_the_cost_model(model, spec, src: str, batch_inputs: dict, image_token_id: int) -> None:
    """FlopCounterMode of one forward of `model` compiled with `src` for `spec` equals the
    cost model's total for that check (every prompt token but the image's is text, full
    logits)."""
    text = int((batch_inputs["input_ids"] != image_token_id).sum())
    with vc.apply(src, model, spec=spec), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch_inputs)
    assert counter.get_total_flops() == estimate(check(src, spec), text_tokens=text, logits="all").flops


def grouped_top_reference(ref, batch_inputs: dict, image_token_id: int, layer: int, group: int, keep: int,
                          new_tokens: int = 6):
    """`keep text top` by hand on tiled images: the last prompt row's head-mean attention at
    `layer - 1`, the top `keep` image positions of every `group` consecutive ones (a tile,
    or an image's tiles) kept, the others masked from `layer` on. Returns (kept [B, ...],
    greedy tokens)."""
    att = last_query_attention(ref, batch_inputs, layer - 1)
    kept, pruned = [], []
    for b, ids in enumerate(batch_inputs["input_ids"]):
        rows = (ids == image_token_id).nonzero().flatten()
        chosen = torch.cat([top_rows(att[b], part, keep) for part in rows.split(group)])
        kept.append(chosen)
        pruned.append(rows[~torch.isin(rows, chosen)])
    return torch.stack(kept), masked_generate(ref, batch_inputs, pruned, from_layer=layer, new_tokens=new_tokens)


def assert_grouped_fastv_matches(model, ref, spec, batch_inputs: dict, image_token_id: int, group: int) -> None:
    """`at llm.layer2 keep text top 50%` compiled for `spec` keeps half of every `group`
    consecutive image positions, the ones `grouped_top_reference` keeps on `ref`, and
    generates its tokens."""
    kept, want = grouped_top_reference(ref, batch_inputs, image_token_id, layer=2, group=group, keep=group // 2)
    with vc.apply("at llm.layer2 keep text top 50%", model, spec=spec):
        with torch.no_grad():
            got = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"].reshape(len(kept), -1), kept)
    assert torch.equal(got, want)


def assert_layer0_uniform_keeps_positions(model, ref, batch_inputs: dict, image_token_id: int, group: int,
                                          keep: int = 4) -> None:
    """`at llm.layer0 keep uniform {keep}` on every `group` consecutive image positions
    generates what `ref` does with the other positions masked from layer 0 on: the kept
    tokens (and the text between and after the tiles) keep their positions."""
    pruned = []
    for ids in batch_inputs["input_ids"]:
        rows = (ids == image_token_id).nonzero().flatten()
        chosen = torch.cat([part[[i * group // keep for i in range(keep)]] for part in rows.split(group)])
        pruned.append(rows[~torch.isin(rows, chosen)])
    want = masked_generate(ref, batch_inputs, pruned, from_layer=0, new_tokens=6)
    with vc.apply(f"at llm.layer0 keep uniform {keep}", model), torch.no_grad():
        got = model.generate(**batch_inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def check_image_counts(tmp_path, model: str, image: str, src: str = "at llm.layer2 keep text top 50%") -> tuple:
    """`vtdsl check --image IMAGE --json` of `src` on `model`, run by the CLI: (visual tokens
    into the LLM, crops, the first stage's tokens out)."""
    import json

    from click.testing import CliRunner

    from vtdsl.cli import main

    policy = tmp_path / "p.vt"
    policy.write_text(f'policy "p"\n{src}\n')
    run = CliRunner().invoke(main, ["check", str(policy), "-m", model, "--image", image, "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    return out["visual_tokens_to_llm"], out["crops"], out["stages"][0]["tokens_out"]


def assert_clip_vit_stage_matches(model, reference, batch_inputs: dict, image_token_id: int, crops: int) -> None:
    """`at vit.layer2 keep cls top 8` on a CLIP anyres model (LLaVA-NeXT, NeXT-Video): the
    features equal `plain_refs.clip_crop_features` (a loop over the layers), generate equals
    `reference` (an uncompiled copy) fed them on 8 placeholders per crop, and the caller's
    prompt comes back."""
    want = clip_crop_features(model, batch_inputs["pixel_values"], prune_at=2, keep=8)
    got, gen = compiled_anyres_vit_run(model, batch_inputs, "at vit.layer2 keep cls top 8", kept=crops * 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen[:, -5:], generate_on_fewer_placeholders(reference, batch_inputs, image_token_id, want))
    assert torch.equal(gen[:, :-5], batch_inputs["input_ids"])


def assert_decode_selection_matches(model, reference, batch_inputs: dict, video_token_id: int, keep: int,
                                    steps: int = 4) -> None:
    """`during decode at llm.layer2 attend top {keep}` on a video: generate's sequences and
    per-step scores equal `plain_refs.decode_reference` on `reference` (an uncompiled eager
    copy), and differ from the unpruned model's after the first step."""
    want = decode_reference(reference, batch_inputs, video_token_id, 2, keep, steps)
    kw = dict(**batch_inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with vc.apply(f"during decode at llm.layer2 attend top {keep}", model), torch.no_grad():
        got = model.generate(**kw)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), step
    with torch.no_grad():
        plain = model.generate(**kw)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores[1:], plain.scores[1:])) > 1e-3
