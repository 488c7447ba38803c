"""The compiler on tiny-llava (CPU): every expected number comes from an independent
computation written here (plain loops over the HF layers, eager attention weights), never
from vtdsl.ops or the compiler itself."""

from __future__ import annotations


import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.ir import check
from vtdsl.lang import parse
from vtdsl.models import get_spec

from plain_refs import clip_cls_scores

SPEC = get_spec("tiny-llava")
IMG = 255
SIZE = 336
P = (SIZE // 14) ** 2  # patches = image tokens per image: 24 x 24 = 576
LLM_LAYERS = 32
F = 24 - 2  # feature layer: vision_feature_layer -2 of 24 CLIP layers = hidden_states[23] = output of layer 22
FASTV = "at llm.layer2 keep text top 50%"
VIT_LAYER = "at vit.layer2 keep cls top 8"
VIT_OUT = "at vit.out keep cls top 8 then merge rest into 2"


def _sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """Random init gives near-uniform attention, hence near-tied scores; scaling the q/k
    projections makes the rankings (and so the reference comparisons) unambiguous. With 576
    image tokens the median of FastV's 50% cut sits in the dense middle of the scores: x12
    (not x6) spreads them enough for the reference's gap check."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                mod.weight.mul_(12.0)
    return model


def build(attn: str = "eager") -> torch.nn.Module:
    return _sharpen(SPEC.build(device="cpu", attn_implementation=attn, seed=0)).eval()


@pytest.fixture(scope="module")
def eager_model():
    return build("eager")


@pytest.fixture(scope="module")
def sdpa_model():
    return build("sdpa")


@pytest.fixture(scope="module")
def uncompiled_run(eager_model):
    """Logits and 8 greedy tokens of the plain eager model on inputs(1)."""
    ids, mask, px = inputs(1)
    with torch.no_grad():
        logits = eager_model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        gen = eager_model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8,
                                   do_sample=False)
    return logits, gen


def plan_of(src: str):
    return check(parse(src), SPEC)


def inputs(batch: int):
    """Prompts with one image each; batch 2 is left-padded (image at different offsets)."""
    g = torch.Generator().manual_seed(1)
    rows = [[5, 6, 7] + [IMG] * P + [8, 9, 10]]
    if batch == 2:
        rows.append([11, 12, 13, 14, 15, 16, 17] + [IMG] * P + [18, 19, 20, 21, 22])
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = torch.tensor(r)
        mask[i, n - len(r) :] = 1
    px = torch.randn(len(rows), 3, SIZE, SIZE, generator=g)
    return ids, mask, px


# ---------------------------------------------------------------------------- references
def masked_reference(model, ids, mask, px, stages, new_tokens: int = 8):
    """LLM stages on the full-length model: every pruned image position is masked out of
    all attention from its stage's layer on (prefill and decode), positions unchanged.

    `stages`: ``[(layer, kind, k)]`` applied in order; kind "text" keeps the k image
    tokens with the highest eager attention from the last query at layer-1 (head mean,
    earlier stages' masks applied), "uniform" keeps ranks floor(i·n/k) of the remaining
    ones. Returns (generated ids, kept positions after the last stage)."""
    ref = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    ref.load_state_dict(model.state_dict())
    batch = ids.shape[0]
    kept = [(ids[b] == IMG).nonzero().flatten() for b in range(batch)]
    pruned_at: list[tuple[int, list[torch.Tensor]]] = []

    def hooks():
        def make(j):
            cols = [torch.cat([p[b] for layer, p in pruned_at if layer <= j] + [torch.zeros(0, dtype=torch.long)])
                    for b in range(batch)]

            def hook(module, args, kwargs):
                m = kwargs["attention_mask"]
                assert m is not None and m.dim() == 4 and m.dtype != torch.bool
                m = m.expand(batch, *m.shape[1:]).clone()
                for b in range(batch):
                    m[b, :, :, cols[b]] = torch.finfo(m.dtype).min
                kwargs["attention_mask"] = m
                return args, kwargs

            return hook

        first = min((layer for layer, _ in pruned_at), default=LLM_LAYERS)
        return [ref.model.language_model.layers[j].register_forward_pre_hook(make(j), with_kwargs=True)
                for j in range(first, LLM_LAYERS)]

    for layer, kind, k in stages:
        if kind == "text":
            handles = hooks()
            try:
                with torch.no_grad():
                    out = ref(input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True)
            finally:
                for h in handles:
                    h.remove()
            att = out.attentions[layer - 1][:, :, -1, :].mean(1)  # [B, N] last query, head mean
        chosen = []
        for b in range(batch):
            if kind == "text":
                s = att[b, kept[b]]
                order = torch.argsort(s, descending=True)
                gap = (s[order[k - 1]] - s[order[k]]).item()
                assert gap > 1e-6, "near-tied scores: the comparison would be ambiguous"
                chosen.append(kept[b][order[:k]].sort().values)
            else:
                n = kept[b].numel()
                chosen.append(kept[b][[i * n // k for i in range(k)]])
        pruned_at.append((layer, [kept[b][~torch.isin(kept[b], chosen[b])] for b in range(batch)]))
        kept = chosen
    handles = hooks()
    try:
        with torch.no_grad():
            gen = ref.generate(
                input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=new_tokens, do_sample=False
            )
    finally:
        for h in handles:
            h.remove()
    return gen, torch.stack(kept)


def fastv_reference(model, ids, mask, px, layer: int, keep: int, new_tokens: int = 8):
    return masked_reference(model, ids, mask, px, [(layer, "text", keep)], new_tokens)


def vit_features_reference(model, px, *, prune_at=None, keep=8, out_keep=None, contextual=0):
    """Image features by a plain loop over the CLIP layers (no hooks, no vtdsl)."""
    vt = model.model.vision_tower
    layers = vt.encoder.layers
    f = F
    with torch.no_grad():
        h = vt.pre_layrnorm(vt.embeddings(px))
        feats = None
        for i, layer in enumerate(layers):
            if i == prune_at:
                # scores from layer i-1's attention: recompute on layer i-1's input
                s = clip_cls_scores(layers[i - 1], prev_in)
                idx = torch.topk(s, keep, dim=1).indices.sort(1).values
                h = torch.cat([h[:, :1], torch.stack([h[b, 1 + idx[b]] for b in range(h.shape[0])])], 1)
            prev_in = h
            h = layer(h, None)
            if i == f:
                feats, feat_in = h[:, 1:], prev_in
        if out_keep is not None:
            s = clip_cls_scores(layers[f], feat_in)  # CLS attention of the feature layer
            rows = []
            for b in range(feats.shape[0]):
                x = feats[b]
                kept = torch.topk(s[b], out_keep).indices.sort().values
                rest = [j for j in range(x.shape[0]) if j not in set(kept.tolist())]
                step = max(1, len(rest) // contextual)
                targets = [rest[i * step] for i in range(contextual)]
                others = [j for j in rest if j not in targets]
                xn = torch.nn.functional.normalize(x, dim=-1)
                groups = {t: [t] for t in targets}
                for j in others:
                    sims = [float(xn[j] @ xn[t]) for t in targets]
                    groups[targets[max(range(len(targets)), key=lambda i: (sims[i], -i))]].append(j)
                ctx = [x[groups[t]].mean(0) for t in targets]
                rows.append(torch.cat([x[kept], torch.stack(ctx)]))
            feats = torch.stack(rows)
        return model.model.multi_modal_projector(feats)


def image_features(model, px):
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=px)
    return torch.stack(list(out.pooler_output))


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("src", ["", "at llm.layer2 keep text top 100%", "at vit.layer1 keep cls top 100%",
                                 f"at vit.out keep cls top {P}", f"at llm.layer0 keep uniform {P}"])
def test_keep_everything_is_identity(eager_model, uncompiled_run, src):
    ids, mask, px = inputs(1)
    base, base_gen = uncompiled_run
    with vc.apply(plan_of(src), eager_model):
        with torch.no_grad():
            got = eager_model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
            gen = eager_model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8,
                                       do_sample=False)
    assert got.shape == base.shape
    assert (got - base).abs().max().item() <= 1e-6
    assert torch.equal(gen, base_gen)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_generate_matches_masked_reference(request, attn, batch):
    model = request.getfixturevalue(f"{attn}_model")
    ids, mask, px = inputs(batch)
    want, want_kept = fastv_reference(model, ids, mask, px, layer=2, keep=P // 2)
    with vc.apply(plan_of(FASTV), model):
        with torch.no_grad():
            got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8,
                                 do_sample=False)
        kept = vc.kept_tokens(model)["llm.layer2#0"]
    assert torch.equal(kept, want_kept)
    assert torch.equal(got, want)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_two_llm_stages_including_layer0_match_reference(request, attn):
    """`llm.layer0` prunes the language model's input (before transformers builds the
    mask); a later text-scored stage reads attention among the remaining tokens."""
    model = request.getfixturevalue(f"{attn}_model")
    ids, mask, px = inputs(2)
    want, want_kept = masked_reference(model, ids, mask, px, [(0, "uniform", 144), (2, "text", 36)])
    with vc.apply("at llm.layer0 keep uniform 144; at llm.layer2 keep text top 36", model):
        with torch.no_grad():
            got = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8,
                                 do_sample=False)
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
        kept = vc.kept_tokens(model)["llm.layer2#1"]
    assert torch.equal(kept, want_kept)
    assert torch.equal(got, want)
    n = ids.shape[1]
    lengths = [out.cache.layers[j].keys.shape[-2] for j in range(LLM_LAYERS)]
    assert lengths == [n - (P - 144)] * 2 + [n - (P - 36)] * (LLM_LAYERS - 2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_cache_is_shorter_from_the_stage_on(request, attn):
    model = request.getfixturevalue(f"{attn}_model")
    ids, mask, px = inputs(2)
    n = ids.shape[1]
    with vc.apply(plan_of(FASTV), model):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
    cache = out.cache
    lengths = [cache.layers[j].keys.shape[-2] for j in range(LLM_LAYERS)]
    assert lengths == [n, n] + [n - P // 2] * (LLM_LAYERS - 2)
    assert out.logits.shape[1] == n - P // 2  # logits of the kept positions


def test_fastv_logits_match_reference_prefill(eager_model):
    """Prefill logits of the kept positions equal the masked full-length model's."""
    ids, mask, px = inputs(2)
    _, kept = fastv_reference(eager_model, ids, mask, px, layer=2, keep=P // 2, new_tokens=1)
    ref = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    ref.load_state_dict(eager_model.state_dict())
    pruned = [sorted(set((ids[b] == IMG).nonzero().flatten().tolist()) - set(kept[b].tolist())) for b in range(2)]

    def mask_pruned(module, args, kwargs):
        m = kwargs["attention_mask"].clone()
        for b, cols in enumerate(pruned):
            m[b, :, :, cols] = torch.finfo(m.dtype).min
        kwargs["attention_mask"] = m
        return args, kwargs

    hs = [ref.model.language_model.layers[j].register_forward_pre_hook(mask_pruned, with_kwargs=True)
          for j in range(2, LLM_LAYERS)]
    with torch.no_grad():
        full = ref(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    for h in hs:
        h.remove()
    with vc.apply(plan_of(FASTV), eager_model):
        with torch.no_grad():
            got = eager_model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    keep_rows = torch.stack([torch.tensor(sorted(set(range(ids.shape[1])) - set(pruned[b]))) for b in range(2)])
    want = torch.stack([full[b, keep_rows[b]] for b in range(2)])
    real = torch.stack([mask[b, keep_rows[b]] for b in range(2)]).bool()  # padded rows are garbage in both
    assert (got - want)[real].abs().max().item() < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vit_layer_stage_features(request, attn):
    model = request.getfixturevalue(f"{attn}_model")
    _, _, px = inputs(2)
    want = vit_features_reference(model, px, prune_at=2, keep=8)
    with vc.apply(plan_of(VIT_LAYER), model):
        got = image_features(model, px)
    assert got.shape == (2, 8, SPEC.llm.hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_vit_out_keep_then_merge_features(eager_model):
    _, _, px = inputs(2)
    want = vit_features_reference(eager_model, px, out_keep=8, contextual=2)
    with vc.apply(plan_of(VIT_OUT), eager_model):
        got = image_features(eager_model, px)
    assert got.shape == (2, 10, SPEC.llm.hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_stage_entering_the_layer_after_the_features_prunes_the_features(eager_model):
    """vit.layer{f+1} is the token set the feature layer hands over: with f = 22 here,
    `at vit.layer23 keep cls top 16` (scores of layer 22) gives the same features as
    `at vit.out keep cls top 16` (scores of the feature layer, 22)."""
    _, _, px = inputs(2)
    with vc.apply(f"at vit.layer{F + 1} keep cls top 16", eager_model):
        a = image_features(eager_model, px)
    with vc.apply("at vit.out keep cls top 16", eager_model):
        b = image_features(eager_model, px)
    assert a.shape == (2, 16, SPEC.llm.hidden)
    assert torch.equal(a, b)


@pytest.mark.parametrize("src", [VIT_LAYER, VIT_OUT])
def test_vit_policies_generate_with_shrunk_prompt(eager_model, src):
    """The placeholder run follows the compiled count: forward and generate take the
    processor's full-length prompt, and agree with an explicitly rewritten one."""
    ids, mask, px = inputs(2)
    plan = plan_of(src)
    with vc.apply(plan, eager_model):
        with torch.no_grad():
            gen = eager_model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=4,
                                       do_sample=False)
            short = vc.rewrite_inputs(ids, mask, image_token_id=IMG, from_count=P, to_count=plan.projector_tokens)
            gen2 = eager_model.generate(**{k: v for k, v in short.items() if v is not None}, pixel_values=px,
                                        max_new_tokens=4, do_sample=False)
    # both return the prompt they were given, then the same new tokens
    assert torch.equal(gen[:, :ids.shape[1]], ids) and int((gen2[0] == IMG).sum()) == plan.projector_tokens
    assert torch.equal(gen[:, ids.shape[1]:], gen2[:, short["input_ids"].shape[1]:])


def test_apply_restores_model_exactly(eager_model):
    ids, mask, px = inputs(2)
    modules = [(n, type(m)) for n, m in eager_model.named_modules()]
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in eager_model.modules()]
    state = {k: v.clone() for k, v in eager_model.state_dict().items()}
    with torch.no_grad():
        before = eager_model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    src = ("at vit.layer1 keep cls top 32; at vit.out keep cls top 16 then merge rest into 4; "
           "at llm.layer1 keep text top 10")
    with vc.apply(plan_of(src), eager_model):
        assert type(eager_model.model.vision_tower.encoder).__name__ == "VtdslCLIPEncoder"
        assert set(eager_model.state_dict()) == set(state)  # same keys while compiled
        with torch.no_grad():
            eager_model(input_ids=ids, attention_mask=mask, pixel_values=px)
            eager_model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=2)
    assert vc.compiled(eager_model) is None and "generate" not in eager_model.__dict__
    assert [(n, type(m)) for n, m in eager_model.named_modules()] == modules
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in eager_model.modules()] == hooks
    after_state = eager_model.state_dict()
    assert set(after_state) == set(state) and all(torch.equal(after_state[k], v) for k, v in state.items())
    with torch.no_grad():
        after = eager_model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    assert torch.equal(before, after)


def test_apply_restores_after_an_exception(eager_model):
    tree = [(n, type(m)) for n, m in eager_model.named_modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with vc.apply(plan_of(VIT_LAYER), eager_model):
            raise RuntimeError("boom")
    assert [(n, type(m)) for n, m in eager_model.named_modules()] == tree
    assert vc.compiled(eager_model) is None


def test_compile_is_permanent_until_uncompile():
    model = build("sdpa")
    out = vc.compile(VIT_LAYER, model)
    assert out is model and vc.compiled(model).plan.projector_tokens == 8
    assert vc.image_token_count(model) == 8 and vc.original_image_token_count(model) == P
    with pytest.raises(vc.CompileError, match="already compiled"):
        vc.compile(FASTV, model)
    vc.uncompile(model)
    assert vc.compiled(model) is None and vc.image_token_count(model) == P


def test_compile_accepts_source_ast_plan_and_path(tmp_path):
    model = build("sdpa")
    path = tmp_path / "p.vt"
    path.write_text(FASTV + "\n")
    for policy in (FASTV, parse(FASTV), plan_of(FASTV), path, str(path)):
        with vc.apply(policy, model):
            assert vc.compiled(model).plan.llm_visual == [P, P] + [P // 2] * (LLM_LAYERS - 2)


def test_listing_names_every_rewrite(sdpa_model):
    src = ("at vit.layer2 keep cls top 16; at vit.out keep cls top 8 then merge rest into 2; "
           "at llm.layer2 keep text top 50%")
    with vc.apply(src, sdpa_model):
        text = vc.compiled(sdpa_model).listing.text()
    for needle in (
        "model.vision_tower.encoder ",
        "vtdsl_vit_stage0 before layers.2",
        "model.vision_tower.encoder.layers.1.self_attn.q_proj",
        "model.multi_modal_projector",
        "model.language_model.layers.2 ",
        "model.language_model.layers.1.self_attn.k_proj",
        "<model>.generate",
        "def forward(self, inputs_embeds",
        "mechanism: vit = fx, llm = hooks",
    ):
        assert needle in text, needle


def test_zoo_policy_compiles_on_meta_llava_7b():
    spec = get_spec("llava-1.5-7b")
    model = spec.build(device="meta")
    src = (
        "at vit.layer12 keep cls top 50%\n"
        "at vit.out keep cls top 162 + uniform 20 then merge rest into 30\n"
        "at llm.layer2 keep text top 50%\n"
        "at llm.layer16 keep text(all) top 25%"
    )
    with vc.apply(src, model):
        handle = vc.compiled(model)
        assert handle.plan.projector_tokens == 212
        assert handle.listing.mechanism == {"vit": "fx", "llm": "hooks"}
        assert "vtdsl_vit_stage0" in handle.listing.fx_code["model.vision_tower.encoder"]
    assert type(model.model.vision_tower.encoder).__name__ == "CLIPEncoder"
