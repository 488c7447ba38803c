"""ViT stages on Qwen3-VL (issue 19 item 2) against a plain loop written here: learned
position embeddings resampled to the patch grid with `F.interpolate` (bilinear, corners
aligned, as Qwen3-VL's `fast_pos_embed_interpolate`), patch rows gathered by merge unit,
each block over the kept units, DeepStack's mergers on each listed block's rows of the
units the merger reads, the merger, then the LLM fed the kept units' features and their
DeepStack features on the kept units' own rows (the dropped units' placeholders masked)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from family_runs import qwen_prefill_parts
from plain_refs import first_error, mrope_inputs, plain_copy, sharpened_pair
from test_qwen25_vl_vit import received_attention, rotary_rows

SPEC = get_spec("tiny-qwen3-vl")  # 4 blocks, DeepStack on blocks 0, 1, 2
IMG = 250


@pytest.fixture(scope="module")
def models():
    return sharpened_pair(SPEC)


def grid_inputs(batch: int, side: int = 16, seed: int = 7) -> dict:
    return mrope_inputs(batch, side=side, seed=seed, patch=16)


# ---------------------------------------------------------------------------- the plain loop
def learned_positions(visual, rows: int, cols: int) -> torch.Tensor:
    """``[units, 4, d]``: the learned position table resampled to rows x cols patches, each
    raster unit's 4 patches in row-major order."""
    n = int(visual.pos_embed.num_embeddings ** 0.5)
    table = visual.pos_embed.weight.view(n, n, -1).permute(2, 0, 1)[None]
    grid = F.interpolate(table, size=(rows, cols), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
    return grid.reshape(rows // 2, 2, cols // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(rows * cols // 4, 4, -1)


def plain_tower(visual, px: torch.Tensor, side: int, keep_at: int | None, choose):
    """One side x side-patch image: returns (kept raster units ascending, merged features
    [k, D], DeepStack features [3][k, D]) with the units `choose(per-unit received attention
    at block keep_at - 1 or None, units)` returns kept before block `keep_at` (None: after
    the merger, on the last block's attention)."""
    d = visual.blocks[0].norm1.normalized_shape[0]
    heads = visual.blocks[0].attn.num_heads
    x = visual.patch_embed(px).view(-1, 4, d) + learned_positions(visual, side, side)
    cos, sin = rotary_rows(visual, side, side)
    units = list(range(x.shape[0]))
    deep = {}
    for i, block in enumerate(visual.blocks):
        if i == keep_at:
            att = received_attention(visual.blocks[i - 1], prev, cos.flatten(0, 1), sin.flatten(0, 1), heads) \
                if i else None
            chosen = set(choose(None if att is None else att.view(-1, 4).sum(1), units))
            slots = [s for s, u in enumerate(units) if u in chosen]
            x, cos, sin, units = x[slots], cos[slots], sin[slots], [units[s] for s in slots]
        prev = x.flatten(0, 1)
        cu = torch.tensor([0, prev.shape[0]], dtype=torch.int32)
        x = block(prev, cu_seqlens=cu, max_seqlen=prev.shape[0],
                  position_embeddings=(cos.flatten(0, 1), sin.flatten(0, 1))).view(-1, 4, d)
        if i in visual.deepstack_visual_indexes:
            deep[i] = dict(zip(units, x))
    if keep_at is None:
        last = received_attention(visual.blocks[-1], prev, cos.flatten(0, 1), sin.flatten(0, 1), heads)
        chosen = set(choose(last.view(-1, 4).sum(1), units))
        slots = [s for s, u in enumerate(units) if u in chosen]
        x, units = x[slots], [units[s] for s in slots]
    merged = visual.merger(x.flatten(0, 1))
    order = sorted(range(len(units)), key=lambda s: units[s])
    kept = sorted(units)
    stacks = [merger(torch.stack([deep[i][u] for u in kept]).flatten(0, 1))
              for i, merger in zip(visual.deepstack_visual_indexes, visual.deepstack_merger_list)]
    return kept, merged[order], stacks


def top(k: int):
    def choose(scores, units):
        return [units[s] for s in scores.topk(k).indices.tolist()]
    return choose


def uniform(k: int):
    def choose(_scores, units):
        return [units[i * len(units) // k] for i in range(k)]
    return choose


def plain_logits(ref, batch: dict, kept: list, feats: list, stacks: list) -> torch.Tensor:
    """The plain LLM's last-row logits: each kept unit's feature at its own placeholder,
    its DeepStack features added to that row after LLM layers 0-2, the other placeholders
    masked out, positions the model's own M-RoPE for the whole prompt."""
    ids = batch["input_ids"]
    embeds = ref.get_input_embeddings()(ids).clone()
    mask = batch["attention_mask"].clone()
    pos, _ = ref.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                      image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
    visual_rows = torch.zeros_like(ids, dtype=torch.bool)
    for b, (units, f) in enumerate(zip(kept, feats)):
        rows = (ids[b] == IMG).nonzero().flatten()
        embeds[b, rows[units]] = f
        visual_rows[b, rows[units]] = True
        mask[b, [r for i, r in enumerate(rows.tolist()) if i not in set(units)]] = 0
    # rows in batch-then-position order, as the model's mask selects them
    deep = [torch.cat([s[j] for s in stacks]) for j in range(len(stacks[0]))]
    out = ref.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                   visual_pos_masks=visual_rows, deepstack_visual_embeds=deep)
    return ref.lm_head(out.last_hidden_state[:, -1])


# ---------------------------------------------------------------------------- against the loop
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("src, keep_at, choose", [
    ("at vit.layer0 keep uniform 20", 0, uniform(20)),  # before every DeepStack block
    ("at vit.layer2 keep attn@vit.layer1 top 20", 2, top(20)),  # blocks 0, 1 before it, 2 after
    ("at vit.layer3 keep attn@vit.layer2 top 20", 3, top(20)),  # after all three
    ("at vit.out keep attn@vit.layer3 top 20", None, top(20)),  # after the merger
])
def test_vit_stage_with_deepstack_equals_the_plain_loop(models, attn, src, keep_at, choose):
    """Kept units, merged and DeepStack features and the LLM's logits (batch 2) equal the
    plain loop's; adding the DeepStack features one kept unit off changes the logits."""
    model = models[attn]
    batch = grid_inputs(2)
    ref = plain_copy(SPEC, model, attn)
    kept, feats, stacks = [], [], []
    with torch.no_grad():
        for b in range(2):
            u, f, s = plain_tower(ref.model.visual, batch["pixel_values"][b * 256:(b + 1) * 256], 16, keep_at, choose)
            kept.append(u), feats.append(f), stacks.append(s)
        want = plain_logits(ref, batch, kept, feats, stacks)
        off = plain_logits(ref, batch, kept, feats, [[t.roll(1, 0) for t in s] for s in stacks])
    with vc.apply(src, model), torch.no_grad():
        got = model(**batch).logits[:, -1]
        assert (next(iter(vc.kept_tokens(model).values())) - 1).tolist() == kept
        tower = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    for b in range(2):
        torch.testing.assert_close(tower.pooler_output[b][kept[b]], feats[b], atol=1e-5, rtol=1e-5)
        for j in range(3):
            torch.testing.assert_close(tower.deepstack_features[j][b][kept[b]], stacks[b][j], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (off - want).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_pool_at_vit_out_pools_the_deepstack_features_alike(models, attn):
    """`pool 2x2` at vit.out: each 2x2 block of merged tokens averaged, at its top-left
    unit's placeholder, its DeepStack features averaged over the same block (batch 2)."""
    model = models[attn]
    batch = grid_inputs(2)
    ref = plain_copy(SPEC, model, attn)

    def pooled(t: torch.Tensor) -> torch.Tensor:  # [64, D] raster units -> [16, D]
        return t.view(4, 2, 4, 2, -1).mean((1, 3)).reshape(16, -1)

    corners = [16 * r + 2 * c for r in range(4) for c in range(4)]
    feats, stacks = [], []
    with torch.no_grad():
        for b in range(2):
            _, f, s = plain_tower(ref.model.visual, batch["pixel_values"][b * 256:(b + 1) * 256], 16, None,
                                  lambda _scores, units: units)
            feats.append(pooled(f)), stacks.append([pooled(t) for t in s])
        want = plain_logits(ref, batch, [corners] * 2, feats, stacks)
    with vc.apply("at vit.out pool 2x2", model), torch.no_grad():
        got = model(**batch).logits[:, -1]
        assert vc.kept_counts(model)["vit"]["vit.out#0"] == (64, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_keeping_every_unit_leaves_the_model_as_it_is(models):
    """`uniform 64` of 64 units before block 0 and at vit.out: the plain model's logits."""
    model = models["sdpa"]
    batch = grid_inputs(2)
    with torch.no_grad():
        want = model(**batch).logits
        for src in ("at vit.layer0 keep uniform 64", "at vit.out keep uniform 64"):
            with vc.apply(src, model):
                torch.testing.assert_close(model(**batch).logits, want, atol=1e-6, rtol=1e-6)


def test_a_cls_free_score_keeps_the_units_a_hand_computation_ranks_first(models):
    """`keep norm@vit.layer1 top 12` at vit.layer2: each unit's 4 patch rows of block 1's
    output, L2 norms summed, the 12 largest per image (of a 16x12-patch image, 48 units)."""
    model = models["eager"]
    batch = mrope_inputs(2, side=16, seed=3, patch=16)
    # a 16 x 12-patch image: drop the last 4 patch columns of each image's grid
    px = batch["pixel_values"].view(2, 8, 8, 4, -1)[:, :, :6].reshape(2 * 192, -1)
    ids = torch.cat([batch["input_ids"][:, :20], batch["input_ids"][:, 36:]], 1)  # 48 placeholders each
    batch = dict(input_ids=ids, attention_mask=torch.cat([batch["attention_mask"][:, :20],
                                                          batch["attention_mask"][:, 36:]], 1),
                 pixel_values=px, image_grid_thw=torch.tensor([[1, 16, 12]] * 2), mm_token_type_ids=(ids == IMG).int())
    ref = plain_copy(SPEC, model)
    out = {}
    hook = ref.model.visual.blocks[1].register_forward_hook(lambda m, a, o: out.setdefault("h", o))
    with torch.no_grad():
        ref.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    hook.remove()
    per_unit = out["h"].float().norm(dim=-1).view(2, 48, 4).sum(-1)
    want = [sorted(row.topk(12).indices.tolist()) for row in per_unit]
    with vc.apply("at vit.layer2 keep norm@vit.layer1 top 12", model), torch.no_grad():
        model(**batch)
        assert (vc.kept_tokens(model)["vit.layer2#0"] - 1).tolist() == want
        assert vc.kept_counts(model)["vit"]["vit.layer2#0"] == (48, 12)


def test_generate_after_a_vit_stage_runs_on_the_kept_rows(models):
    model = models["eager"]
    batch = grid_inputs(2)
    with vc.apply("at vit.layer2 keep attn@vit.layer1 top 16; at llm.layer1 keep text top 8", model), \
            torch.no_grad():
        got = model.generate(**batch, max_new_tokens=3, do_sample=False)
        counts = vc.kept_counts(model)
    assert got.shape == (2, batch["input_ids"].shape[1] + 3)
    assert counts["vit"]["vit.layer2#0"] == (64, 16) and counts["llm"]["llm.layer1#1"] == (16, 8)


# ---------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("src", [
    "at vit.layer2 keep attn@vit.layer1 top 20",
    "at vit.out keep norm@vit.layer3 top 16",
    "at vit.layer1 keep uniform 24; at vit.out keep uniform 12",
    "at vit.out pool 2x2",
])
def test_compiled_flops_equal_the_cost_model_part_by_part(models, src):
    """The tiny model's compiled prefill by module: the tower with its DeepStack mergers
    (on the units the merger reads) and scores, the merger, the LLM, lm_head."""
    got = qwen_prefill_parts(models["eager"], src, grid_inputs(1))
    want = estimate(check(src, SPEC), text_tokens=8, logits="all").policy.by_part()
    assert got == {"vit": want["vit"] + want["scorers"], **{p: want[p] for p in ("projector", "llm", "lm_head")}}


@pytest.mark.slow
def test_a_vit_stage_on_qwen3_vl_8b_costs_what_flop_counter_counts_part_by_part():
    """`keep uniform 144` of 576 units at vit.layer12 (between DeepStack blocks 8 and 16)
    at 768x768: a plain pruned prefill on the meta model (blocks 0-11 on 2304 patches,
    12-26 on 576, DeepStack's three mergers and the merger on 144 units, the LLM on 144
    visual tokens) counted by FlopCounterMode equals `vtdsl check` part by part, and the
    architecture's FLOPs by hand."""
    spec = get_spec("qwen3-vl-8b")
    model = spec.build(device="meta", attn_implementation="eager")
    vis = model.model.visual
    text, k, n, d = 64, 144, 2304, 1152
    got = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            x = vis.patch_embed(torch.empty(n, 1536, device="meta", dtype=model.dtype))
            rope = torch.empty(n, d // 16, device="meta")
            for i, block in enumerate(vis.blocks):
                m = n if i < 12 else 4 * k
                x = block(x[:m], cu_seqlens=torch.tensor([0, m], dtype=torch.int32), max_seqlen=m,
                          position_embeddings=(rope[:m], rope[:m]))
            for merger in vis.deepstack_merger_list:
                merger(x)
        got["vit"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            merged = vis.merger(x)
        got["projector"] = counter.get_total_flops()
        embeds = torch.cat([model.get_input_embeddings()(torch.zeros(1, text, dtype=torch.long, device="meta")),
                            merged[None]], 1)
        with FlopCounterMode(display=False) as counter:
            # M-RoPE streams (values do not change FLOPs); 3 rows: no packed-sequence check
            pos = torch.arange(text + k).expand(3, 1, -1).to("meta")
            model(inputs_embeds=embeds, position_ids=pos, use_cache=False, logits_to_keep=1)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    top_name = type(model).__name__
    got.update(llm=counts[f"{top_name}.model.language_model"], lm_head=counts[f"{top_name}.lm_head"])
    block = lambda p: 2 * p * (4 * d * d + 2 * d * 4304) + 4 * d * p * p  # noqa: E731
    merger = 2 * k * (4608 * 4608 + 4608 * 4096)
    big_n, h = text + k, 4096
    layer = 2 * big_n * (2 * h * 4096 + 2 * h * 1024 + 3 * h * 12288) + 4 * big_n * big_n * 4096
    assert got == {"vit": 2 * n * 1536 * d + 12 * block(n) + 15 * block(4 * k) + 3 * merger,
                   "projector": merger, "llm": 36 * layer, "lm_head": 2 * h * 151936}
    report = estimate(check("at vit.layer12 keep uniform 144", spec), text_tokens=text, logits="last")
    assert report.policy.by_part() == {**got, "scorers": 0}


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("src, at, words", [
    ("at vit.layer2 keep attn@vit.layer1 top 20 then merge rest into 4", "keep", "DeepStack mergers turn each"),
    ("at llm.layer2 pool 2x2", "pool", "hands on merged tokens"),
    ("at vit.layer3 keep attn@vit.layer2 top 20 then merge rest into 4; at vit.out pool 2x2", "keep",
     "a pool at vit.out"),
])
def test_a_vit_stage_that_merges_is_refused_where_written(src, at, words):
    d = first_error(src, SPEC)
    assert (d.span.line, d.span.column, d.code) == (1, src.index(at) + 1, "model-layout")
    assert words in d.message + (d.expected or "")
