"""`renumber`: after an LLM prune the remaining tokens get contiguous RoPE positions
(PDrop, SparseVLM v1) in prefill and in every decode step.

The reference is a plain loop over the HF decoder layers that re-runs the whole sequence
(prompt + generated tokens) for every new token, physically removing the pruned rows and
re-numbering positions as the language reference defines it: each remaining row's
position minus the rows the stage removed before it. No cache, no vtdsl code."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import PolicyError, check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id
P = 576
NEW = 6


def _sharpen(model):
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                mod.weight.mul_(12.0)
    return model


@pytest.fixture(scope="module")
def models():
    eager = _sharpen(SPEC.build(device="cpu", attn_implementation="eager", seed=0)).eval()
    sdpa = SPEC.build(device="cpu", attn_implementation="sdpa", seed=0).eval()
    sdpa.load_state_dict(eager.state_dict())
    return {"eager": eager, "sdpa": sdpa}


def inputs():
    """Two prompts, left-padded, the image at different offsets."""
    rows = [[5, 6, 7] + [IMG] * P + [8, 9, 10], [11, 12, 13, 14, 15, 16, 17] + [IMG] * P + [18, 19, 20, 21, 22]]
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    px = torch.randn(len(rows), 3, 336, 336, generator=torch.Generator().manual_seed(3))
    return ids, mask, px


def _hf_inputs(model, ids, mask, px):
    """What transformers hands the language model: the prompt's embeddings (image features
    scattered in) and the position ids of the prompt and of each generated token."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((kwargs["inputs_embeds"].detach().clone(), kwargs["position_ids"].clone()))

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=NEW + 1,
                           do_sample=False)
    finally:
        handle.remove()
    embeds, prompt_pid = seen[0]
    step_pid = [pid[:, -1] for _, pid in seen[1:]]
    return embeds, prompt_pid.expand(ids.shape[0], -1), step_pid


def plain_reference(model, ids, mask, px, stages):
    """Greedy tokens and prefill logits of the pruned model by full recomputation.

    `stages`: ``[(layer, kind, k, renumber)]``; kind "uniform" keeps ranks floor(i·n/k) of
    the image rows present, "text" the k image rows with the highest attention from the
    last row at layer-1 (head mean, eager weights of this loop)."""
    lm = model.model.language_model
    embeds, prompt_pid, step_pid = _hf_inputs(model, ids, mask, px)
    batch, n0 = ids.shape
    tokens, prefill_logits = [], None
    picked: dict[tuple[int, int], torch.Tensor] = {}  # (stage, sample) -> prompt rows chosen in prefill
    for step in range(NEW + 1):
        outs = []
        for b in range(batch):
            h = torch.cat([embeds[b]] + [lm.embed_tokens(t[b].view(1)) for t in tokens])[None]
            pos = torch.cat([prompt_pid[b], torch.stack([p[b] for p in step_pid[:len(tokens)]])
                             if tokens else torch.zeros(0, dtype=torch.long)])
            valid = torch.cat([mask[b].bool(), torch.ones(len(tokens), dtype=torch.bool)])
            img = torch.cat([ids[b] == IMG, torch.zeros(len(tokens), dtype=torch.bool)])
            orig = torch.arange(len(img))
            weights = {}
            for j, layer in enumerate(lm.layers):
                for i_stage, (layer_at, kind, k, renumber) in enumerate(stages):
                    if layer_at != j:
                        continue
                    rows = img.nonzero().flatten()
                    if step:  # the prompt's choice stands while decoding
                        chosen = torch.isin(orig, picked[i_stage, b]).nonzero().flatten()
                    elif kind == "uniform":
                        chosen = rows[[i * len(rows) // k for i in range(k)]]
                    else:
                        s = weights[j - 1][rows]
                        order = torch.argsort(s, descending=True)
                        assert (s[order[k - 1]] - s[order[k]]).item() > 1e-6, "near-tied scores"
                        chosen = rows[order[:k]]
                    picked[i_stage, b] = orig[chosen]
                    keep = ~img
                    keep[chosen] = True
                    if renumber:
                        removed_before = torch.cumsum((~keep).long(), 0)
                        pos = pos - removed_before
                    h, pos, valid, img, orig = h[:, keep], pos[keep], valid[keep], img[keep], orig[keep]
                n = h.shape[1]
                allowed = torch.ones(n, n, dtype=torch.bool).tril() & valid[None, :]
                m4 = torch.zeros(1, 1, n, n).masked_fill(~allowed, torch.finfo(h.dtype).min)
                pe = lm.rotary_emb(h, pos[None])
                captured = {}
                hook = layer.self_attn.register_forward_hook(lambda mod, a, out: captured.update(w=out[1]))
                try:
                    h = layer(h, attention_mask=m4, position_embeddings=pe, position_ids=pos[None])
                finally:
                    hook.remove()
                h = h[0] if isinstance(h, tuple) else h
                if captured.get("w") is not None:
                    weights[j] = captured["w"][0, :, -1, :].mean(0)
            outs.append(model.lm_head(lm.norm(h))[0, -1])
        logits = torch.stack(outs)
        if step == 0:
            prefill_logits = logits
        if step == NEW:
            break
        tokens.append(logits.argmax(-1))
    return torch.cat([ids, torch.stack(tokens, 1)], 1), prefill_logits


def compiled_run(model, policy, ids, mask, px):
    with vc.apply(policy, model), torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=NEW,
                             do_sample=False)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, -1]
    return gen, logits


CASES = {
    "one stage": ("at llm.layer2 keep uniform 144 renumber", [(2, "uniform", 144, True)]),
    "layer0, plain, renumber": (
        "at llm.layer0 keep uniform 288 renumber; at llm.layer3 keep uniform 72; at llm.layer5 keep uniform 36 renumber",
        [(0, "uniform", 288, True), (3, "uniform", 72, False), (5, "uniform", 36, True)],
    ),
    "score after renumber": (
        "at llm.layer2 keep uniform 288 renumber; at llm.layer4 keep text top 8",
        [(2, "uniform", 288, True), (4, "text", 8, False)],
    ),
}


@pytest.fixture(scope="module")
def references(models):
    """The plain loop's result per case, computed once for both attention kernels."""
    cache = {}

    def get(case):
        if case not in cache:
            with torch.no_grad():
                cache[case] = plain_reference(models["eager"], *inputs(), CASES[case][1])
        return cache[case]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("attn, case", [("eager", c) for c in CASES] + [("sdpa", "layer0, plain, renumber")])
def test_generate_and_logits_match_the_plain_loop(models, references, attn, case):
    policy = CASES[case][0]
    ids, mask, px = inputs()
    want_gen, want_logits = references(case)
    got_gen, got_logits = compiled_run(models[attn], policy, ids, mask, px)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got_gen, want_gen)


def test_renumbering_changes_the_result(models):
    """The reference tells the two apart: without `renumber` the same cut gives other logits."""
    ids, mask, px = inputs()
    _, kept_positions = compiled_run(models["eager"], "at llm.layer2 keep uniform 144", ids, mask, px)
    _, renumbered = compiled_run(models["eager"], "at llm.layer2 keep uniform 144 renumber", ids, mask, px)
    assert (kept_positions - renumbered).abs().max().item() > 1e-2


def test_decode_cache_and_positions(models):
    """Each decode step's position ids entering layers after the cut are shifted by the rows
    removed; the layers before it see the original ones."""
    ids, mask, px = inputs()
    model = models["sdpa"]
    seen: dict[int, list[torch.Tensor]] = {1: [], 3: []}
    with vc.apply("at llm.layer2 keep uniform 144 renumber", model), torch.no_grad():
        # registered after the compiler's hooks, so they see what the layers are handed
        hooks = [model.model.language_model.layers[j].register_forward_pre_hook(
            lambda mod, a, kw, j=j: seen[j].append(kw["position_ids"].clone()), with_kwargs=True) for j in seen]
        try:
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, do_sample=False)
        finally:
            for h in hooks:
                h.remove()
    before, after = seen[1], seen[3]
    assert after[0].shape[1] == ids.shape[1] - (P - 144)
    for step in (1, 2):
        assert torch.equal(after[step], before[step] - (P - 144))


def test_language_forms_and_checks():
    src = "at llm.layer2 keep text top 64 renumber\nevery 2 layers from llm.layer4 to llm.layer8 merge 8 renumber\n"
    policy = parse(src)
    assert format_policy(policy) == src
    assert [s.renumber for s in policy.stages] == [True, True]
    assert from_yaml(to_yaml(policy)) == policy
    assert "renumber: true" in to_yaml(policy)
    plan = check(policy, "llava-1.5-7b")
    assert [(s.site.layer, s.renumber) for s in plan.stages] == [(2, True), (4, True), (6, True), (8, True)]
    with pytest.raises(PolicyError) as err:
        check("at vit.layer3 keep cls top 50% renumber", "llava-1.5-7b")
    d = err.value.diagnostics[0]
    assert (d.span.line, d.span.column) == (1, 32)
    assert "vision tower" in d.message
    # the cost model does not care where positions start
    renumbered = check("at llm.layer2 keep text top 64 renumber", "llava-1.5-7b")
    plain = check("at llm.layer2 keep text top 64", "llava-1.5-7b")
    assert estimate(renumbered).to_json() == estimate(plain).to_json()
