"""`then recycle rest into RxC cells` (VFlowOpt's recycling): the tokens a stage drops,
grouped by R x C cells of the token grid, each cell's weighted by the first term's score
(s_j / sum s), become one token per cell after the kept ones. The reference is a plain
loop over the cells on what the uncompiled model hands out."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.cost import estimate
from vtdsl.ir import check
from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.models import get_spec

from plain_refs import feature_layer, first_error, last_query_attention, sharpen_llm

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


def test_parses_formats_and_round_trips():
    policy = parse("at vit.out keep cls top 64  then recycle rest into 2x3 cells")
    cells = policy.stages[0].action.rest
    assert (cells.kind, cells.rows, cells.cols) == ("cells", 2, 3)
    assert format_policy(policy) == "at vit.out keep cls top 64 then recycle rest into 2x3 cells\n"
    assert from_yaml(to_yaml(policy)) == policy
    assert "recycle_cells: 2x3" in to_yaml(policy)


@pytest.mark.parametrize("src, message, column", [
    ("at vit.out keep cls top 64 then recycle rest into 4x4 cells",
     "a 4x4 cell can hold as few as 36 tokens, which the terms (keeping 64) could all keep", 28),
    ("at vit.out keep uniform 64 then recycle rest into 2x2 cells",
     "'recycle rest into cells' weights the dropped tokens by the first term's score", 17),
    ("at vit.layer4 keep cls top 300\nat vit.out keep cls top 64 then recycle rest into 2x2 cells",
     "'recycle rest into 2x2 cells' needs the full token grid", 28),
    ("at vit.out keep cls top 4 then recycle rest into 30x2 cells",
     "'30x2 cells' split a 24x24 token grid into empty cells", 27),
])
def test_misuse_is_a_located_check_error(src, message, column):
    diag = first_error(src, "llava-1.5-7b")
    assert message in diag.message and diag.span.column == column


def test_counts_and_cost():
    plan = check("at vit.out keep cls top 64 then recycle rest into 2x2 cells", "llava-1.5-7b")
    assert plan.visual_tokens_to_llm == 68
    same = check("at vit.out keep cls top 68", "llava-1.5-7b")
    assert estimate(plan).flops == estimate(same).flops  # weighted sums: no matmul


def _cells_reference(x: torch.Tensor, scores: torch.Tensor, kept: list[int], rows: int, cols: int, side: int):
    """Per cell (row bands floor(r*rows/side), column bands likewise), in raster cell
    order: the score-weighted mean of its dropped tokens and its best dropped token."""
    out, best = [], []
    for cr in range(rows):
        for cc in range(cols):
            members = [i for i in range(side * side) if i not in kept
                       and (i // side) * rows // side == cr and (i % side) * cols // side == cc]
            w = torch.stack([scores[i] for i in members])
            out.append(sum(x[i] * (scores[i] / w.sum()) for i in members))
            best.append(max(members, key=lambda i: float(scores[i])))
    return torch.stack(out), best


def test_vit_out_cells_follow_the_plain_loop():
    model = SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(9))
    cls, feats = (t[0] for t in feature_layer(model, px, SPEC))
    kept = sorted(cls.argsort(descending=True)[:64].tolist())
    cells, best = _cells_reference(feats, cls, kept, 2, 2, 24)
    with torch.no_grad():
        want = model.model.multi_modal_projector(torch.cat([feats[kept], cells])[None])
    with vc.apply("at vit.out keep cls top 64 then recycle rest into 2x2 cells", model), torch.no_grad():
        got = model.model.get_image_features(pixel_values=px).pooler_output
        model(input_ids=torch.tensor([[5] + [IMG] * 68 + [8]]), pixel_values=px)
        ids = [v - 1 for v in vc.kept_tokens(model)["vit.out#0"][0].tolist()]
    torch.testing.assert_close(torch.cat(list(got)) if isinstance(got, (list, tuple)) else got[0], want[0],
                               atol=1e-5, rtol=1e-5)
    assert ids == kept + best


def test_llm_cells_take_their_best_dropped_tokens_place():
    model = sharpen_llm(SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval())
    ids = torch.tensor([[5, 6] + [IMG] * 576 + [8, 9, 10]])
    px = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(10))
    scores = last_query_attention(model, {"input_ids": ids, "pixel_values": px}, 1)[0, 2:578]
    kept = sorted(scores.argsort(descending=True)[:40].tolist())
    with torch.no_grad():
        hidden = model(input_ids=ids, pixel_values=px, output_hidden_states=True).hidden_states[2][0, 2:578]
    cells, best = _cells_reference(hidden, scores, kept, 2, 2, 24)
    seen = {}
    layer = model.model.language_model.layers[2]
    with vc.apply("at llm.layer2 keep text top 40 then recycle rest into 2x2 cells", model), torch.no_grad():
        # registered after the compiler's hook, so it sees what layer 2 is handed
        hook = layer.register_forward_pre_hook(lambda m, a, kw: seen.update(h=(a[0] if a else kw["hidden_states"])),
                                               with_kwargs=True)
        try:
            model(input_ids=ids, pixel_values=px)
        finally:
            hook.remove()
        got = vc.kept_tokens(model)["llm.layer2#0"][0].tolist()
    assert sorted(got) == sorted(2 + i for i in kept + best)
    # each cell token sits where its best dropped token was: rows in position order
    rows = sorted(kept + best)
    entering = seen["h"][0, 2:2 + len(rows)]
    for c, b in enumerate(best):
        torch.testing.assert_close(entering[rows.index(b)], cells[c], atol=1e-4, rtol=1e-4)
