"""The policy zoo: every file is valid, canonical and costed; four methods' kept tokens
equal an independent plain-Python reimplementation of the paper's rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import vtdsl.compiler as vc
from vtdsl.cli import main
from vtdsl.ir import check
from vtdsl.ir.rescale import rescale
from vtdsl.lang import parse_file
from vtdsl.models import get_spec

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "policies").glob("*.vt"))
SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id
PREFIX, SUFFIX = [5, 6, 7], [8, 9, 10, 11]
# the papers' models of the zoo and the tiny random variant each file is also checked on
TINY = {"llava-1.5-7b": "tiny-llava", "qwen2.5-vl-7b": "tiny-qwen2.5-vl", "qwen2-vl-7b": "tiny-qwen2-vl"}


def test_zoo_is_complete():
    methods = {p.stem.split("-")[0] for p in ZOO}
    expected = {"fastv", "pdrop", "sparsevlm", "visionzip", "hiprune", "divprune", "feather", "visiondrop",
                "todre", "holov", "vtc", "flowcut", "dart", "tome", "dyvte", "turbo", "vflowopt", "random", "pool"}
    assert expected <= methods


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_zoo_file_is_canonical_documented_and_checks(path):
    text = path.read_text()
    assert text.startswith("# "), "each zoo file starts with its paper comment"
    header = text.split("\npolicy ")[0]
    if path.stem.startswith(("random", "pool")):
        assert "baseline" in header.lower()
    else:
        assert "arXiv" in header, "a method's comment names its paper's arXiv id"
    result = CliRunner().invoke(main, ["fmt", "--check", str(path)])
    assert result.exit_code == 0, result.output
    policy = parse_file(path)
    assert policy.name and policy.model in TINY, "a method is set for its paper's model, which has a tiny variant"
    # tiny-llava keeps LLaVA-1.5's layers; the tiny Qwen towers have 4 blocks, so a file
    # naming a 7B block is carried onto its tiny variant by relative depth first
    tiny = rescale(policy, get_spec(policy.model), get_spec(TINY[policy.model])).policy
    for model, written in ((policy.model, policy), (TINY[policy.model], tiny)):
        plan = check(written, model)
        assert [d for d in plan.diagnostics if d.code != "model-hint"] == []


def test_zoo_table_is_up_to_date():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_zoo_table.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------
# Kept tokens against independent reimplementations (tiny-llava, eager attention).


@pytest.fixture(scope="module")
def model():
    """Random weights give near-uniform attention and so near-tied scores; larger query
    weights make attention peaked, as in a trained model, so top-k is unambiguous."""
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def batch():
    ids = torch.tensor([PREFIX + [IMG] * 576 + SUFFIX])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids), px


def _kept(model, policy: Path, ids, mask, px) -> dict[str, torch.Tensor]:
    with vc.apply(policy, model), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=px)
        return {k: v.clone() for k, v in vc.kept_tokens(model).items()}


def _top(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest scores, ties to the lower index, returned in order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    assert scores[order[k - 1]] - scores[order[k]] > 1e-7, "near tie: comparison would be ambiguous"
    return sorted(order[:k])


def _last_query_attention(model, ids, mask, px, dropped_by_layer: dict[int, list[int]], layer: int,
                          renumber: bool = False) -> list[float]:
    """Eager attention of the last position at `layer`, head mean, with every position in
    dropped_by_layer[j] masked out of attention in layers >= j; positions unchanged, or
    with `renumber` each position less the dropped positions before it."""
    lm = model.model.language_model
    layers = lm.layers

    def masker(j):
        cols = [p for start, ps in dropped_by_layer.items() if start <= j for p in ps]

        def hook(module, args, kwargs):
            m = kwargs["attention_mask"].clone()
            m[..., cols] = torch.finfo(m.dtype).min
            kwargs["attention_mask"] = m
            if renumber:
                gone = torch.zeros(m.shape[-1], dtype=torch.long)
                gone[cols] = 1
                pid = kwargs["position_ids"] - (torch.cumsum(gone, 0) - gone)
                kwargs["position_ids"] = pid
                kwargs["position_embeddings"] = lm.rotary_emb(args[0] if args else kwargs["hidden_states"], pid)
            return args, kwargs

        return hook

    handles = [layers[j].register_forward_pre_hook(masker(j), with_kwargs=True)
               for j in range(len(layers)) if any(start <= j for start in dropped_by_layer)]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    row = out.attentions[layer][0, :, -1, :].mean(0)
    return row.tolist()


def _text_rule(model, batch, schedule: list[tuple[int, float]], own_layer: bool = False,
               renumber: bool = False) -> list[list[int]]:
    """At each (layer K, fraction), keep the top fraction of the remaining image tokens by
    the last token's attention: layer K-1's (FastV), or with `own_layer` layer K's own
    attention over the tokens entering it (PDrop: K's norm and q/k on its input; in this
    full-length reference, K's attention with the earlier-dropped positions masked).
    Returns the kept prompt positions of each stage."""
    ids, mask, px = batch
    kept = [i for i, t in enumerate(ids[0].tolist()) if t == IMG]
    dropped: dict[int, list[int]] = {}
    history = []
    for layer, fraction in schedule:
        att = _last_query_attention(model, ids, mask, px, dropped, layer if own_layer else layer - 1, renumber)
        k = int(len(kept) * fraction + 0.5)
        chosen = [kept[i] for i in _top([att[p] for p in kept], k)]
        dropped[layer] = sorted(set(kept) - set(chosen))
        kept = chosen
        history.append(chosen)
    return history


def test_fastv_keeps_what_the_paper_rule_keeps(model, batch):
    kept = _kept(model, ROOT / "policies" / "fastv.vt", *batch)
    (expected,) = _text_rule(model, batch, [(2, 0.5)])
    assert sorted(kept["llm.layer2#0"][0].tolist()) == expected


def test_pdrop_keeps_what_the_paper_rule_keeps(model, batch):
    kept = _kept(model, ROOT / "policies" / "pdrop.vt", *batch)
    expected = _text_rule(model, batch, [(8, 0.5), (16, 0.5), (24, 0.5)], own_layer=True, renumber=True)
    got = [sorted(kept[f"llm.layer{k}#{i}"][0].tolist()) for i, k in enumerate((8, 16, 24))]
    assert [len(g) for g in got] == [288, 144, 72]
    assert got == expected


def _features(model, px) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS attention of the feature layer, head mean, over patches; projected features)."""
    with torch.no_grad():
        out = model.model.vision_tower(px, output_attentions=True, output_hidden_states=True)
        cls = out.attentions[SPEC.feature_layer_index][0, :, 0, 1:].mean(0)
        feats = model.model.multi_modal_projector(out.hidden_states[SPEC.vision_feature_layer][:, 1:])
    return cls, feats[0]


def test_visionzip_keeps_cls_dominant_and_strided_contextual_targets(model, batch):
    ids, mask, px = batch
    projected = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))
    try:
        kept = _kept(model, ROOT / "policies" / "visionzip.vt", *batch)["vit.out#0"][0].tolist()
    finally:
        handle.remove()
    cls, _ = _features(model, px)
    dominant = _top(cls.tolist(), 161)  # VisionZip's "dominant 162" is CLS + 161 patches
    rest = [i for i in range(576) if i not in set(dominant)]
    step = max(1, len(rest) // 30)
    targets = [rest[i * step] for i in range(30)]
    # the log names tokens by vid: 0 = CLS, 1 + raster patch index; contextual tokens by their target
    assert len(kept) == 192 and kept[0] == 0
    assert sorted(v - 1 for v in kept[1:162]) == dominant
    assert [v - 1 for v in kept[162:]] == targets
    # the first visual token the LLM gets is the projected CLS row of the feature layer
    with torch.no_grad():
        hidden = model.model.vision_tower(px, output_hidden_states=True).hidden_states[SPEC.vision_feature_layer]
        cls_row = model.model.multi_modal_projector(hidden[:, :1])
    assert projected[0].shape[1] == 192
    torch.testing.assert_close(projected[0][:, :1], cls_row)


def test_divprune_keeps_the_greedy_max_min_diverse_set(model, batch):
    ids, mask, px = batch
    kept = _kept(model, ROOT / "policies" / "divprune.vt", *batch)["llm.layer0#0"][0].tolist()
    _, feats = _features(model, px)
    unit = [[x / sum(y * y for y in row) ** 0.5 for x in row] for row in feats.tolist()]
    n = len(unit)
    dist = [[1.0 - sum(a * b for a, b in zip(unit[i], unit[j])) for j in range(n)] for i in range(n)]
    # DivPrune's first pick: the token whose nearest other token is farthest away
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    closest = list(dist[chosen[0]])
    while len(chosen) < 56:
        nxt = max((i for i in range(n) if i not in chosen), key=lambda i: (closest[i], -i))
        chosen.append(nxt)
        closest = [min(c, d) for c, d in zip(closest, dist[nxt])]
    start = len(PREFIX)
    assert sorted(p - start for p in kept) == sorted(chosen)
