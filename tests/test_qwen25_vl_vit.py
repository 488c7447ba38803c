"""ViT stages on Qwen2.5-VL and Qwen2-VL (vtdsl.compiler.merge_units) against a plain loop
over the tower's blocks written here: patch rows gathered by merge unit, windows and
cu_seqlens recomputed by hand over the kept units, rotary rows of the kept patches, the
merger, then the LLM fed the kept units' features at their own M-RoPE positions (the
dropped units' placeholders masked out)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from plain_refs import plain_copy, sharpened_pair

IMG, START, END = 250, 251, 252


@pytest.fixture(scope="module", params=["tiny-qwen2.5-vl", "tiny-qwen2-vl"])
def family(request):
    spec = get_spec(request.param)
    return spec, sharpened_pair(spec)


def grid_inputs(batch: int, rows: int, cols: int, seed: int = 7) -> dict:
    """One rows x cols-patch image per prompt; batch 2 left-padded with id 2."""
    n_img = rows * cols // 4
    prompts = [[5, 6, 7, START] + [IMG] * n_img + [END, 8, 9, 10],
               [11, 12, 13, 14, 15, START] + [IMG] * n_img + [END, 18, 19]][:batch]
    n = max(len(r) for r in prompts)
    ids = torch.full((batch, n), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(prompts):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    px = torch.randn(batch * rows * cols, 1176, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px,
                image_grid_thw=torch.tensor([[1, rows, cols]] * batch), mm_token_type_ids=(ids == IMG).int())


# ---------------------------------------------------------------------------- the plain loop
def window_order(urows: int, ucols: int, side: int) -> list[int]:
    """Raster unit indices window by window (side x side units each), as the tower orders
    them; side 0: raster order."""
    if not side:
        return list(range(urows * ucols))
    return [r * ucols + c for wr in range(0, urows, side) for wc in range(0, ucols, side)
            for r in range(wr, min(wr + side, urows)) for c in range(wc, min(wc + side, ucols))]


def segments(units: list[int], ucols: int, side: int, full: bool) -> list[int]:
    """Patch counts of the attention segments of one image's kept units (tower order)."""
    if full or not side:
        return [4 * len(units)]
    lengths, last = [], None
    for u in units:
        key = (u // ucols // side, u % ucols // side)
        if key != last:
            lengths.append(0)
            last = key
        lengths[-1] += 4
    return lengths


def rotary_rows(visual, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[units, 4, dh]`` per raster unit: patch (r, c) at (row, column) position
    ids, the unit's 4 patches in row-major order."""
    ids = []
    for ur in range(rows // 2):
        for uc in range(cols // 2):
            ids += [(2 * ur + i, 2 * uc + j) for i in range(2) for j in range(2)]
    cos, sin = visual.rotary_pos_emb(torch.zeros(1), torch.tensor(ids))
    return cos.view(-1, 4, cos.shape[-1]), sin.view(-1, 4, sin.shape[-1])


def received_attention(block, x: torch.Tensor, cos, sin, heads: int) -> torch.Tensor:
    """``[n]``: mean attention each patch receives over all of the image's queries and the
    heads, q and k as the block's attention rotates them."""
    n, d = x.shape
    q, k, _ = block.attn.qkv(block.norm1(x)).view(n, 3, heads, -1).unbind(1)
    cos, sin = cos[:, None].float(), sin[:, None].float()

    def rot(t):
        t = t.float()
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    q, k = rot(q).transpose(0, 1), rot(k).transpose(0, 1)
    probs = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
    return probs.mean((0, 1))


def plain_tower(model, spec, px: torch.Tensor, rows: int, cols: int, keep_at: int, choose) -> tuple[list, torch.Tensor]:
    """One image through the tower, keeping at block `keep_at` the units `choose(scores
    per unit, x per unit)` returns (raster indices); returns (kept raster units ascending,
    their merged features in raster order)."""
    visual = model.model.visual
    side = int(spec.vit_window ** 0.5) // 2 if spec.vit_window else 0
    full = set(spec.vit_full_attention) if side else set(range(spec.vit.layers))
    ucols = cols // 2
    order = window_order(rows // 2, ucols, side)
    x = visual.patch_embed(px).view(-1, 4, spec.vit.hidden)[order]
    cos, sin = (t[order] for t in rotary_rows(visual, rows, cols))
    units = order
    for i, block in enumerate(visual.blocks):
        if i == keep_at:
            att = received_attention(visual.blocks[i - 1], prev, *(t.flatten(0, 1) for t in prev_rope), spec.vit.heads)
            chosen = set(choose(dict(zip(prev_units, att.view(-1, 4).sum(1).tolist())), dict(zip(units, x))))
            slots = [s for s, u in enumerate(units) if u in chosen]
            x, cos, sin = x[slots], cos[slots], sin[slots]
            units = [units[s] for s in slots]
        prev, prev_rope, prev_units = x.flatten(0, 1), (cos, sin), units
        lengths = segments(units, ucols, side, i in full)
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        x = block(x.flatten(0, 1), cu_seqlens=cu, max_seqlen=max(lengths),
                  position_embeddings=(cos.flatten(0, 1), sin.flatten(0, 1))).view(-1, 4, spec.vit.hidden)
    merged = visual.merger(x.flatten(0, 1))
    raster = sorted(range(len(units)), key=lambda s: units[s])
    return sorted(units), merged[raster]


def top_units(k: int):
    def choose(scores: dict, _x: dict) -> list[int]:
        return sorted(scores, key=lambda u: -scores[u])[:k]
    return choose


def plain_logits(ref, batch: dict, kept: list[list[int]], features: list[torch.Tensor]) -> torch.Tensor:
    """Last-position logits of the plain model fed the kept units' features at their
    placeholders, the other placeholders masked out, positions the model's own M-RoPE."""
    ids = batch["input_ids"]
    embeds = ref.get_input_embeddings()(ids).clone()
    mask = batch["attention_mask"].clone()
    pos, _ = ref.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                      image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    for b, (units, feats) in enumerate(zip(kept, features)):
        rows = (ids[b] == IMG).nonzero().flatten()
        embeds[b, rows[units]] = feats
        dropped = [r for i, r in enumerate(rows.tolist()) if i not in set(units)]
        mask[b, dropped] = 0
    return ref(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("rows, cols, batch", [(16, 16, 2), (16, 12, 1)])
def test_vit_stage_equals_the_plain_loop(family, attn, rows, cols, batch):
    """`keep attn@vit.layer1 top 20` at vit.layer2 (a window block on Qwen2.5-VL, blocks 1
    and 3 full): kept units, merged features and the LLM's logits equal the plain loop's;
    16x12 patches is a non-square image (8x6 units, partial windows)."""
    spec, models = family
    model = models[attn]
    batch_inputs = grid_inputs(batch, rows, cols)
    units = rows * cols // 4
    k = 20
    ref = plain_copy(spec, model, attn)
    kept, feats = [], []
    with torch.no_grad():
        for b in range(batch):
            px = batch_inputs["pixel_values"][b * rows * cols:(b + 1) * rows * cols]
            u, f = plain_tower(ref, spec, px, rows, cols, 2, top_units(k))
            kept.append(u)
            feats.append(f)
        want = plain_logits(ref, batch_inputs, kept, feats)
    src = "at vit.layer2 keep attn@vit.layer1 top 20"
    with vc.apply(src, model), torch.no_grad():
        got = model(**batch_inputs).logits[:, -1]
        assert (vc.kept_tokens(model)["vit.layer2#0"] - 1).tolist() == kept
        tower = model.model.get_image_features(batch_inputs["pixel_values"], batch_inputs["image_grid_thw"])
    for b in range(batch):
        out = tower.pooler_output[b]
        torch.testing.assert_close(out[kept[b]], feats[b], atol=1e-5, rtol=1e-5)
        dropped = [u for u in range(units) if u not in set(kept[b])]
        assert not out[dropped].any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_score_read_by_vit_out_is_summed_per_unit(family):
    """`keep knorm@vit.layer3 top 12` at vit.out: the L1 norm of block 3's keys (rotary
    applied) summed over each unit's 4 patches and 4 heads, by hand; the LLM gets 12 tokens."""
    spec, models = family
    model = models["eager"]
    batch_inputs = grid_inputs(1, 16, 16)
    ref = plain_copy(spec, model)
    visual = ref.model.visual
    captured = {}
    hook = visual.blocks[3].attn.qkv.register_forward_hook(lambda m, a, out: captured.setdefault("qkv", out))
    with torch.no_grad():
        ref.model.get_image_features(batch_inputs["pixel_values"], batch_inputs["image_grid_thw"])
    hook.remove()
    side = int(spec.vit_window ** 0.5) // 2 if spec.vit_window else 0
    order = window_order(8, 8, side)
    cos, sin = (t[order].flatten(0, 1)[:, None].float() for t in rotary_rows(visual, 16, 16))
    k = captured["qkv"].view(256, 3, spec.vit.heads, -1)[:, 1].float()
    half = k.shape[-1] // 2
    k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
    per_unit = k.abs().sum((1, 2)).view(64, 4).sum(1)
    want = sorted(order[s] for s in per_unit.topk(12).indices.tolist())
    with vc.apply("at vit.out keep knorm@vit.layer3 top 12", model), torch.no_grad():
        model(**batch_inputs)
        assert (vc.kept_tokens(model)["vit.out#0"] - 1).tolist() == [want]
        assert vc.kept_counts(model)["vit"]["vit.out#0"] == (64, 12)


def test_generate_after_vit_stages_decodes_from_the_kept_rows(family):
    """generate() under a ViT stage and an LLM stage equals greedy decoding of the plain
    model on the same prompt with the dropped units masked (the first token here)."""
    spec, models = family
    model = models["eager"]
    batch_inputs = grid_inputs(2, 16, 16)
    with vc.apply("at vit.out keep uniform 16; at llm.layer1 keep text top 8", model), torch.no_grad():
        got = model.generate(**batch_inputs, max_new_tokens=3, do_sample=False)
        counts = vc.kept_counts(model)
    assert got.shape == (2, batch_inputs["input_ids"].shape[1] + 3)
    assert counts["vit"]["vit.out#0"] == (64, 16) and counts["llm"]["llm.layer1#1"] == (16, 8)


@pytest.mark.parametrize("src, exact", [
    ("at vit.out keep norm@vit.layer3 top 16", True),
    ("at vit.layer3 keep attn@vit.layer2 top 20", True),  # block 3 attends per image on both
    ("at vit.layer1 keep attn@vit.layer0 top 20", False),  # window block 2 after it (Qwen2.5-VL)
    ("at vit.out keep diverse 16", True),  # the selection's cosines at the merger's width
    ("at vit.layer3 keep diverse 20", True),  # ... at a unit's width, 4 patch rows
])
def test_compiled_flops_against_the_cost_model_part_by_part(family, src, exact):
    """FlopCounterMode of the compiled prefill, by part (tower, merger, LLM, lm_head), equals
    `vtdsl check`'s; after a stage, a window block's attention depends on how the kept units
    fall into windows: the cost model charges full windows, an upper bound."""
    spec, models = family
    model = models["eager"]
    batch_inputs = grid_inputs(1, 16, 16)
    with vc.apply(src, model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch_inputs)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    top = type(model).__name__
    tower = f"{top}.model.visual"
    got = {"vit": counts[tower] - counts[f"{tower}.merger"], "projector": counts[f"{tower}.merger"],
           "llm": counts[f"{top}.model.language_model"], "lm_head": counts[f"{top}.lm_head"]}
    report = estimate(check(src, spec), text_tokens=8, logits="all").policy.by_part()
    scorers = report.pop("scorers")
    assert {p: got[p] for p in ("projector", "llm", "lm_head")} == {p: report[p] for p in ("projector", "llm", "lm_head")}
    windows_after = spec.vit_window and any(i not in spec.vit_full_attention for i in range(1, spec.vit.layers))
    # the tower's scores run inside it (on its q/k projections' hooks)
    if exact or not windows_after:
        assert got["vit"] == report["vit"] + scorers
    else:
        assert got["vit"] <= report["vit"] + scorers


@pytest.mark.parametrize("score", ["norm", "gnorm", "vnorm", "global_attn", "anchors"])
def test_cls_free_scores_choose_whole_units_of_each_image(family, score):
    """Each CLS-free ViT score drives a stage on merge units: every image keeps its own 10
    distinct units of the 48 of a 16x12-patch image, and vit.out's `diverse 8` 8 of them."""
    spec, models = family
    model = models["eager"]
    with vc.apply(f"at vit.layer2 keep {score}@vit.layer1 top 10; at vit.out keep diverse 8", model), torch.no_grad():
        model(**grid_inputs(2, 16, 12))
        kept, counts = vc.kept_tokens(model), vc.kept_counts(model)["vit"]
    assert counts == {"vit.layer2#0": (48, 10), "vit.out#1": (10, 8)}
    for layer, out in ((kept["vit.layer2#0"], 10), (kept["vit.out#1"], 8)):
        assert layer.shape == (2, out) and all(len(set(row.tolist())) == out for row in layer)
        assert int(layer.min()) >= 1 and int(layer.max()) <= 48
    assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(kept["vit.layer2#0"], kept["vit.out#1"]))


def test_vit_stages_on_a_video_spec_are_refused_naming_its_groups():
    spec = get_spec("qwen2.5-vl-7b").for_video(16, 448, 448)
    with pytest.raises(Exception) as err:
        check("at vit.layer4 keep attn@vit.layer3 top 50%", spec)
    assert "8 temporal groups" in str(err.value) and "merge units of one image" in str(err.value)


def test_a_vit_out_count_is_in_merged_tokens_and_placeholders_stay():
    """On qwen2.5-vl-7b at 672x672 a ViT site has the 576 merge units (the LLM's tokens), the
    tower 2304 patches; a stage at vit.layer8 keeping 144 units leaves 576 patches in blocks
    8.., the merger 144 tokens, and the prompt its 576 placeholders."""
    plan = check("at vit.layer8 keep attn@vit.layer7 top 25%", get_spec("qwen2.5-vl-7b"))
    assert (plan.stages[0].tokens_in, plan.stages[0].tokens_out) == (576, 144)
    assert plan.vit_tokens == [2304] * 8 + [576] * 24
    assert (plan.projector_tokens, plan.image_placeholders, plan.llm_visual[0]) == (144, 576, 144)


@pytest.mark.parametrize("src, at, code, words", [
    ("at vit.out keep cls@vit.layer3 top 10", "cls@", "no-cls", "vision tower has no CLS token"),
    ("at vit.layer2 keep informativity@vit.layer1 top 10", "informativity@", "no-cls", "has no CLS token"),
    ("at vit.out keep attn(no_rope)@vit.layer3 top 10", "attn(", "scorer-args", "2-D RoPE"),
])
def test_what_reads_a_cls_token_or_unrotated_keys_is_refused_where_written(src, at, code, words):
    from plain_refs import first_error

    for name in ("tiny-qwen2.5-vl", "tiny-qwen2-vl"):
        d = first_error(src, get_spec(name))
        assert (d.span.line, d.span.column, d.code) == (1, src.index(at) + 1, code)
        assert words in d.message and name in d.message


def test_vit_scores_read_by_an_llm_stage_align_with_the_merged_tokens(family):
    """`attn@vit.layer1` read by `llm.layer2` (no ViT stage): the tower hands on every unit
    and the LLM stage keeps the 16 tokens whose units received the most attention at
    block 1 (per patch, over the whole image, summed per unit), by hand."""
    spec, models = family
    model = models["eager"]
    batch_inputs = grid_inputs(1, 16, 16)
    ref = plain_copy(spec, model)
    visual = ref.model.visual
    side = int(spec.vit_window ** 0.5) // 2 if spec.vit_window else 0
    order = window_order(8, 8, side)
    with torch.no_grad():
        x = visual.patch_embed(batch_inputs["pixel_values"]).view(-1, 4, spec.vit.hidden)[order]
        cos, sin = (t[order] for t in rotary_rows(visual, 16, 16))
        cu = torch.tensor([0] + segments(order, 8, side, 0 in set(spec.vit_full_attention) or not side)).cumsum(0)
        x = visual.blocks[0](x.flatten(0, 1), cu_seqlens=cu.to(torch.int32), max_seqlen=int(cu.diff().max()),
                             position_embeddings=(cos.flatten(0, 1), sin.flatten(0, 1)))
        att = received_attention(visual.blocks[1], x, cos.flatten(0, 1), sin.flatten(0, 1), spec.vit.heads)
    per_unit = dict(zip(order, att.view(-1, 4).sum(1).tolist()))
    want = sorted(sorted(per_unit, key=lambda u: -per_unit[u])[:16])
    with vc.apply("at llm.layer2 keep attn@vit.layer1 top 16", model), torch.no_grad():
        model(**batch_inputs)
        kept = vc.kept_tokens(model)["llm.layer2#0"]
    rows = (batch_inputs["input_ids"][0] == IMG).nonzero().flatten()
    assert kept[0].tolist() == rows[want].tolist()
