"""ViT stages inside the tower on InternVL3, Gemma 3 and SmolVLM (vtdsl.compiler.vit_groups),
against a plain loop over the tower's layers written here: the score by hand per patch,
summed over each merge unit (the 2x2, 4x4 or s x s group the connector fuses), the top
units' patch rows kept (CLS too on InternViT), the later layers run on them alone, then
each kept unit fused by hand (its patches' channels side by side for a pixel shuffle, their
mean for Gemma 3's pool) and projected; the LLM's input embeddings are the prompt with one
placeholder per kept unit holding those features. Expected counts come from the grids."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.flop_counter import FlopCounterMode

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.models import get_spec

from plain_refs import first_error, plain_copy, sharpen_llm


@dataclass(frozen=True)
class Family:
    name: str
    tiles: int  # tiles (views) per prompt
    stage_at: int  # the layer stage's site; its score reads the layer before
    score: str  # the score the stage reads (`cls` on InternViT, `attn` elsewhere)
    size: tuple[int, int] | None  # an image the processor cuts into `tiles` tiles


# InternVL3: a 64x128 image is 1x2 tiles and the thumbnail; SmolVLM: 256x64 is 4x1 tiles
# and the global view
FAMILIES = [Family("tiny-internvl3", 3, 2, "cls", (64, 128)), Family("tiny-gemma3", 1, 1, "attn", None),
            Family("tiny-smolvlm", 5, 2, "attn", (256, 64))]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request):
    fam = request.param
    spec = get_spec(fam.name)
    model = spec.build(device="cpu", attn_implementation="eager", seed=0).eval()
    # a random tower attends almost uniformly: sharper queries make the rankings unambiguous
    with torch.no_grad():
        for name, mod in model.named_modules():
            if ("vision" in name) and name.endswith("q_proj"):
                mod.weight.mul_(6.0)
    return fam, spec, sharpen_llm(model)


def inputs(fam: Family, spec, batch: int, per_tile: int, seed: int = 3) -> dict:
    """`per_tile` placeholders per tile between text, batch 2 left-padded (pad 0); the
    pixel layout each model takes (InternVL: tiles stacked, SmolVLM: [B, tiles, ...])."""
    img = spec.image_token_id
    rows = [torch.tensor([5, 6] + [img] * (fam.tiles * per_tile) + [8, 9, 10])]
    if batch == 2:
        rows.append(torch.tensor([11, 12, 13, 14] + [img] * (fam.tiles * per_tile) + [15, 16, 17]))
    ids = pad_sequence(rows, batch_first=True, padding_value=0, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    side = spec.image_size
    px = torch.randn(len(rows) * fam.tiles, 3, side, side, generator=torch.Generator().manual_seed(seed))
    out = dict(input_ids=ids, attention_mask=mask, pixel_values=px)
    if "smolvlm" in fam.name:
        out["pixel_values"] = px.view(len(rows), fam.tiles, 3, side, side)
    if "gemma3" in fam.name:
        out["token_type_ids"] = (ids == img).long()
    return out


# ---------------------------------------------------------------------------- the plain loop
def tower_parts(fam: Family, ref):
    """(embed, layers, final norm, q/k of a layer's input, CLS rows, connector of kept units)."""
    inner = ref.model
    if "internvl" in fam.name:
        vt = inner.vision_tower
        return (vt.embeddings, list(vt.encoder.layer), vt.layernorm,
                lambda layer, h: (layer.attention.q_proj(layer.layernorm_before(h)),
                                  layer.attention.k_proj(layer.layernorm_before(h))), 1,
                lambda units: inner.multi_modal_projector(torch.stack([u.flatten() for u in units])))
    vt = inner.vision_tower if "gemma3" in fam.name else inner.vision_model
    qk = lambda layer, h: (layer.self_attn.q_proj(layer.layer_norm1(h)), layer.self_attn.k_proj(layer.layer_norm1(h)))
    if "gemma3" in fam.name:
        proj = inner.multi_modal_projector
        fuse = lambda units: proj.mm_soft_emb_norm(torch.stack([u.mean(0) for u in units])) @ \
            proj.mm_input_projection_weight
    else:
        fuse = lambda units: inner.connector.modality_projection(torch.stack([u.flatten() for u in units]))
    embed = vt.embeddings if "gemma3" in fam.name else \
        (lambda px: vt.embeddings(px, torch.ones(px.shape[0], *([px.shape[-1] // 8] * 2), dtype=torch.bool)))
    return embed, list(vt.encoder.layers), vt.post_layernorm, qk, 0, fuse


def received(q: torch.Tensor, k: torch.Tensor, heads: int, cls: int, score: str) -> torch.Tensor:
    """Per patch: the CLS row's attention (`cls`) or the mean attention over every query
    (`attn`), softmax over every key, head mean."""
    n = q.shape[0]
    q, k = q.view(n, heads, -1).transpose(0, 1), k.view(n, heads, -1).transpose(0, 1)
    probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    rows = probs[:, :1] if score == "cls" else probs
    return rows.mean((0, 1))[cls:]


def plain_tile(fam: Family, spec, ref, px: torch.Tensor, keep: int) -> tuple[list[int], torch.Tensor]:
    """One tile: (kept units' raster indices ascending, their LLM features in that order)."""
    embed, layers, norm, qk, cls, fuse = tower_parts(fam, ref)
    m = spec.spatial_merge
    rows, cols = spec.grid
    unit_of = {r * cols + c: (r // m) * (cols // m) + c // m for r in range(rows) for c in range(cols)}
    h = embed(px[None])[0]
    present = list(range(rows * cols))  # raster patch index of each row after CLS
    for i, layer in enumerate(layers):
        if i == fam.stage_at:
            att = received(*qk(layers[i - 1], before), spec.vit.heads, cls, fam.score)
            per_unit: dict[int, float] = {}
            for p, a in zip(present, att.tolist()):
                per_unit[unit_of[p]] = per_unit.get(unit_of[p], 0.0) + a
            ranked = sorted(per_unit, key=lambda u: -per_unit[u])
            assert per_unit[ranked[keep - 1]] - per_unit[ranked[keep]] > 1e-6, "near-tied unit scores"
            chosen = set(ranked[:keep])
            slots = [s for s, p in enumerate(present) if unit_of[p] in chosen]
            h = torch.cat([h[:cls], h[cls:][slots]])
            present = [present[s] for s in slots]
        before = h
        h = layer(h[None], attention_mask=None)[0] if cls == 0 else layer(h[None])[0]
    h = norm(h)[cls:]
    kept = sorted({unit_of[p] for p in present})
    units = []
    for u in kept:  # the unit's patches row by row
        r0, c0 = (u // (cols // m)) * m, (u % (cols // m)) * m
        units.append(torch.stack([h[present.index((r0 + i) * cols + c0 + j)] for i in range(m) for j in range(m)]))
    return kept, fuse(units)


def language_model(fam: Family, model):
    return model.model.text_model if "smolvlm" in fam.name else model.model.language_model


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("batch", [1, 2])
def test_a_layer_stage_equals_the_plain_loop(family, batch):
    """`at vit.layerN keep <score>@vit.layer(N-1) top 6`: each tile keeps the plain loop's 6
    units (of 16), and the LLM's input embeddings are the prompt with 6 placeholders per tile
    holding the plain loop's features of the kept units (left padding included)."""
    fam, spec, model = family
    keep = 6
    ref = plain_copy(spec, model)
    batch_inputs = inputs(fam, spec, batch, spec.image_tokens)
    px = batch_inputs["pixel_values"].reshape(-1, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        plain = [plain_tile(fam, spec, ref, tile, keep) for tile in px]
        short = inputs(fam, spec, batch, keep)["input_ids"]
        want = ref.get_input_embeddings()(short).clone()
        feats = torch.cat([f for _, f in plain]).view(batch, -1, want.shape[-1])
        for b in range(batch):
            want[b, short[b] == spec.image_token_id] = feats[b].to(want.dtype)
    seen = {}
    hook = language_model(fam, model).register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
    src = f"at vit.layer{fam.stage_at} keep {fam.score}@vit.layer{fam.stage_at - 1} top {keep}"
    try:
        with vc.apply(src, model), torch.no_grad():
            model(**batch_inputs)
            kept = vc.kept_tokens(model)[f"vit.layer{fam.stage_at}#0"]
            counts = vc.kept_counts(model)["vit"]
    finally:
        hook.remove()
    assert counts == {f"vit.layer{fam.stage_at}#0": (spec.image_tokens, keep)}
    assert (kept - 1).tolist() == [k for k, _ in plain]
    torch.testing.assert_close(seen["embeds"], want, atol=1e-5, rtol=1e-5)


def test_generate_after_a_layer_stage_and_vit_out(family):
    """generate() under a layer stage, a vit.out stage on the kept units and an LLM stage
    (batch 2, left-padded): the prompt is cut to the kept units, 3 new tokens each."""
    fam, spec, model = family
    batch_inputs = inputs(fam, spec, 2, spec.image_tokens)
    src = (f"at vit.layer{fam.stage_at} keep norm@vit.layer{fam.stage_at - 1} top 8; at vit.out keep diverse 5; "
           "at llm.layer1 keep text top 3")
    with vc.apply(src, model), torch.no_grad():
        assert vc.image_token_count(model) == 5
        got = model.generate(**batch_inputs, max_new_tokens=3, do_sample=False)
        counts, kept = vc.kept_counts(model), vc.kept_tokens(model)
    assert got.shape == (2, batch_inputs["input_ids"].shape[1] + 3)
    assert counts["vit"] == {f"vit.layer{fam.stage_at}#0": (16, 8), "vit.out#1": (8, 5)}
    assert counts["llm"]["llm.layer1#2"] == (5, 3)  # per tile: the spec's counts are one tile's
    inner, outer = kept[f"vit.layer{fam.stage_at}#0"], kept["vit.out#1"]
    assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(inner, outer))


def _parts(fam: Family, model, counter) -> dict[str, int]:
    """FlopCounterMode by part: the tower (its scores inside it), the projector after the
    shuffle or pool, the LLM, lm_head."""
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    top = type(model).__name__
    tower, projector = {"tiny-internvl3": ("model.vision_tower", "model.multi_modal_projector"),
                        "tiny-gemma3": ("model.vision_tower", "model.multi_modal_projector"),
                        "tiny-smolvlm": ("model.vision_model", "model.connector")}[fam.name]
    llm = "model.text_model" if "smolvlm" in fam.name else "model.language_model"
    return {"vit": counts.get(f"{top}.{tower}", 0), "projector": counts.get(f"{top}.{projector}", 0),
            "llm": counts[f"{top}.{llm}"], "lm_head": counts[f"{top}.lm_head"]}


@pytest.mark.parametrize("src", ["at vit.layer{n} keep attn@vit.layer{p} top 6",
                                 "at vit.layer{n} keep diverse 6",  # cosines at a unit's width
                                 "at vit.layer{n} keep norm@vit.layer{p} top 8; at vit.out keep diverse 4",
                                 "at vit.layer{n} keep knorm@vit.layer{p} top 4 + diverse 2 then merge rest into 2 "
                                 "by keys"])
def test_compiled_flops_equal_the_cost_model_part_by_part(family, src):
    """FlopCounterMode of the compiled prefill (one prompt, every tile pruned alike), by
    part, equals `vtdsl check`'s on the spec sized for the prompt's tiles. A vit.out stage
    runs in the projector's pre-hook, so FlopCounterMode books its selection (diverse's
    cosines) under the projector and the cost model under the tower: their sum is compared."""
    fam, spec, model = family
    src = src.format(n=fam.stage_at, p=fam.stage_at - 1)
    batch_inputs = inputs(fam, spec, 1, spec.image_tokens)
    sized = spec.for_image(*fam.size) if fam.size else spec
    assert sized.vit_crops == fam.tiles
    with vc.apply(src, model, spec=sized), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch_inputs)
    got = _parts(fam, model, counter)
    text = int((batch_inputs["input_ids"] != spec.image_token_id).sum())
    report = estimate(check(src, sized), text_tokens=text, logits="all").policy.by_part()
    scorers = report.pop("scorers")
    want = {"vit": report["vit"] + scorers, **{p: report[p] for p in ("projector", "llm", "lm_head")}}
    if "vit.out" in src:
        got["vit"], want["vit"] = got["vit"] + got.pop("projector"), want["vit"] + want.pop("projector")
    assert got == want


def test_counts_on_the_full_size_models():
    """At vit.layer8 a site has one tile's (view's) merge units: InternVL3-8B 16x16 of 2x2
    (the tower then runs CLS + 4 patches per kept unit), Gemma 3 16x16 of 4x4, SmolVLM 9x9
    of 3x3; the projector and the prompt get the kept units."""
    for name, units, unit, cls in (("internvl3-8b", 256, 4, 1), ("gemma-3-4b", 256, 16, 0),
                                   ("smolvlm-2.2b", 81, 9, 0)):
        spec = get_spec(name)
        plan = check("at vit.layer8 keep attn@vit.layer7 top 25%", spec)
        kept = units // 4
        assert (plan.stages[0].tokens_in, plan.stages[0].tokens_out) == (units, kept), name
        layers = spec.vit.layers
        assert plan.vit_tokens == [units * unit + cls] * 8 + [kept * unit + cls] * (layers - 8), name
        assert plan.projector_tokens == plan.image_placeholders == plan.llm_visual[0] == kept, name


@pytest.mark.parametrize("name, src, at, code, words", [
    ("tiny-gemma3", "at vit.layer1 keep cls@vit.layer0 top 4", "cls@", "no-cls", "has no CLS token"),
    ("tiny-smolvlm", "at vit.layer2 keep informativity@vit.layer1 top 4", "informativity@", "no-cls",
     "has no CLS token"),
    ("tiny-internvl3", "at vit.layer2 keep cls_token + cls@vit.layer1 top 4", "cls_token", "cls-token",
     "never reaches it"),
    ("tiny-internvl3", "at llm.layer2 keep cls@vit.layer1 top 4", "cls@", "model-layout", "summed over each"),
    ("tiny-gemma3", "at vit.layer1 keep attn(no_rope)@vit.layer0 top 4", "attn(", "scorer-args",
     "no rotary position"),
])
def test_what_stays_refused_is_located(name, src, at, code, words):
    """CLS scores on the CLS-free towers, `cls_token` inside the tower, ViT scores read by an
    LLM stage (its tokens are not the groups the scores were summed over), `no_rope`."""
    d = first_error(src, get_spec(name))
    assert (d.span.line, d.span.column, d.code) == (1, src.index(at) + 1, code)
    assert words in d.message, d.message


@pytest.mark.parametrize("score", ["norm", "gnorm", "vnorm", "global_attn", "anchors", "knorm"])
def test_cls_free_scores_choose_whole_units_of_each_tile(family, score):
    """Each CLS-free ViT score drives a layer stage: every tile keeps its own 7 distinct units
    of 16, and vit.out's `diverse 4` 4 of them."""
    fam, spec, model = family
    src = f"at vit.layer{fam.stage_at} keep {score}@vit.layer{fam.stage_at - 1} top 7; at vit.out keep diverse 4"
    with vc.apply(src, model), torch.no_grad():
        model(**inputs(fam, spec, 2, spec.image_tokens))
        kept, counts = vc.kept_tokens(model), vc.kept_counts(model)["vit"]
    inner = kept[f"vit.layer{fam.stage_at}#0"]
    assert counts == {f"vit.layer{fam.stage_at}#0": (16, 7), "vit.out#1": (7, 4)}
    for layer, out in ((inner, 7), (kept["vit.out#1"], 4)):
        assert layer.shape == (2 * fam.tiles, out) and all(len(set(row.tolist())) == out for row in layer)
        assert int(layer.min()) >= 1 and int(layer.max()) <= 16
    assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(inner, kept["vit.out#1"]))


# ---------------------------------------------------------------------------- full size, meta
# (model, image, stage site, units kept in the tower per tile, units kept at vit.out)
FULL_SIZE = [("internvl3-8b", (896, 896), 12, 64, 32), ("gemma-3-4b", None, 12, 64, 32),
             ("smolvlm-2.2b", (1536, 1536), 12, 27, 9)]


def _meta_tower_parts(model):
    """(patch embedding of [tiles, 3, s, s], layers, CLS rows, projector on the kept
    units' fused rows, LLM) of a meta InternVL3 / Gemma 3 / SmolVLM model."""
    inner = model.model
    if hasattr(inner, "connector"):  # SmolVLM: every patch real, so no patch mask
        vt = inner.vision_model
        mask = lambda px: torch.ones(px.shape[0], *([px.shape[-1] // 14] * 2), dtype=torch.bool, device="meta")
        return (lambda px: vt.embeddings(px, mask(px)), vt.encoder.layers, 0,
                inner.connector.modality_projection, inner.text_model)
    if hasattr(inner.vision_tower, "encoder") and hasattr(inner.vision_tower.encoder, "layer"):  # InternViT
        vt = inner.vision_tower
        return vt.embeddings, vt.encoder.layer, 1, inner.multi_modal_projector, inner.language_model
    vt, proj = inner.vision_tower, inner.multi_modal_projector  # Gemma 3: pool, norm, one matmul
    project = lambda units: proj.mm_soft_emb_norm(units) @ proj.mm_input_projection_weight  # noqa: E731
    return vt.embeddings, vt.encoder.layers, 0, project, inner.language_model


def _plain_pruned_prefill(spec, model, at: int, keep: int, out_keep: int, text: int) -> dict[str, int]:
    """FlopCounterMode by part of a prefill pruned by hand on the meta model: every tile's
    blocks before `at` on all its rows, the blocks from `at` on CLS + `keep` units' patches,
    the projector on `out_keep` units per tile (their patches fused: channels side by side,
    or Gemma 3's pooled mean), the LLM on text + tiles · out_keep visual rows, the head on
    the last row. Which rows are kept changes no FLOPs, so the first ones are."""
    embed, layers, cls, project, llm = _meta_tower_parts(model)
    tiles, unit, dt = spec.vit_crops, spec.spatial_merge ** 2, model.dtype
    fused = spec.vit.hidden * (1 if spec.family == "gemma3" else unit)
    got = {}

    def counted(part, fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = fn()
        got[part] = counter.get_total_flops()
        return out

    def tower():
        h = embed(torch.zeros(tiles, 3, spec.image_size, spec.image_size, device="meta", dtype=dt))
        for i, layer in enumerate(layers):
            h = h[:, :cls + keep * unit] if i == at else h
            out = layer(h, attention_mask=None) if cls == 0 else layer(h)
            h = out[0] if isinstance(out, tuple) else out

    counted("vit", tower)
    counted("projector", lambda: project(torch.zeros(tiles, out_keep, fused, device="meta", dtype=dt)))
    embeds = torch.zeros(1, text + tiles * out_keep, spec.llm.hidden, device="meta", dtype=dt)
    states = counted("llm", lambda: llm(inputs_embeds=embeds).last_hidden_state)
    counted("lm_head", lambda: model.lm_head(states[:, -1:]))
    return got


@pytest.mark.slow
@pytest.mark.parametrize("name, size, at, keep, out_keep", FULL_SIZE, ids=[f[0] for f in FULL_SIZE])
def test_merge_unit_stages_on_the_full_size_model_cost_what_flop_counter_counts(name, size, at, keep, out_keep):
    """`at vit.layer12 keep uniform K; at vit.out keep uniform K'` on the full-size meta
    model (InternVL3-8B at 896x896: 5 tiles of 16x16 2x2 units plus CLS; Gemma 3 4B: one
    view of 16x16 4x4 units; SmolVLM 2.2B at 1536x1536: 17 tiles of 9x9 3x3 units): a
    plain pruned prefill counted by FlopCounterMode equals `vtdsl check` part by part,
    and the tower's and projector's FLOPs by hand."""
    spec = get_spec(name)
    spec = spec.for_image(*size) if size else spec
    model = spec.build(device="meta", attn_implementation="eager")
    text = 64
    got = _plain_pruned_prefill(spec, model, at, keep, out_keep, text)
    src = f"at vit.layer{at} keep uniform {keep}; at vit.out keep uniform {out_keep}"
    report = estimate(check(src, spec), text_tokens=text, logits="last")
    assert report.policy.by_part() == {**got, "scorers": 0}
    d, ffn, tiles, unit = spec.vit.hidden, spec.vit.ffn, spec.vit_crops, spec.spatial_merge ** 2
    cls = 1 if spec.has_cls else 0
    n_all, n_kept = cls + spec.grid[0] * spec.grid[1], cls + keep * unit
    block = lambda n: 2 * n * (4 * d * d + 2 * d * ffn) + 4 * d * n * n  # noqa: E731
    patch = 2 * spec.grid[0] * spec.grid[1] * 3 * 14 * 14 * d
    assert got["vit"] == tiles * (patch + at * block(n_all) + (spec.vit.layers - at) * block(n_kept))
    h = spec.llm.hidden
    projector = {"internvl": 2 * out_keep * (unit * d * h + h * h), "gemma3": 2 * out_keep * d * h,
                 "idefics3": 2 * out_keep * unit * d * h}[spec.family]
    assert got["projector"] == tiles * projector
