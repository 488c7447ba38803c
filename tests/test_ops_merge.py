"""Merge / pool / gather ops against plain-Python references (loops over lists)."""

from __future__ import annotations

import math

import pytest
import torch

from vtdsl.ops.merge import (
    bipartite_merge,
    contextual_targets,
    drop_all,
    gather_tokens,
    merge_rest,
    pool2d,
    pooled_grid,
)


def ref_cos(u, v):
    nu = max(math.sqrt(sum(a * a for a in u)), 1e-12)
    nv = max(math.sqrt(sum(a * a for a in v)), 1e-12)
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def vmean(vs):
    return [sum(col) / len(vs) for col in zip(*vs)]


def ref_merge_rest(x, kept, t, metric=None, mode="mean"):
    metric = metric or x
    n = len(x)
    rest = [j for j in range(n) if j not in kept]
    step = max(1, len(rest) // t)
    targets = [rest[i * step] for i in range(t)]
    others = [j for j in rest if j not in targets]
    groups = {tg: [] for tg in targets}
    assign = {j: i for i, j in enumerate(kept)}
    for j in others:
        sims = [ref_cos(metric[j], metric[tg]) for tg in targets]
        best = max(range(t), key=lambda i: (sims[i], -i))
        groups[targets[best]].append(j)
        assign[j] = len(kept) + best
    out = [x[j] for j in kept]
    for i, tg in enumerate(targets):
        assign[tg] = len(kept) + i
        members = groups[tg]
        if mode == "mean":
            out.append(vmean([x[tg]] + [x[j] for j in members]))
        else:
            extra = vmean([x[j] for j in members]) if members else [0.0] * len(x[tg])
            out.append([a + b for a, b in zip(x[tg], extra)])
    return out, [assign[j] for j in range(n)]


def ref_bipartite(x, r, size=None, protect_first=False):
    n = len(x)
    size = size or [1.0] * n
    a = list(range(0, n, 2))
    bb = list(range(1, n, 2))
    best = {}
    for i in a:
        sims = [ref_cos(x[i], x[j]) for j in bb]
        if protect_first and i == 0:
            sims = [-math.inf] * len(bb)
        jb = max(range(len(bb)), key=lambda q: (sims[q], -q))
        best[i] = (sims[jb], bb[jb])
    order = sorted(a, key=lambda i: (-best[i][0], i))
    merged = order[:r]
    acc = {j: ([v * size[j] for v in x[j]], size[j]) for j in bb}
    for i in merged:
        j = best[i][1]
        vec, sz = acc[j]
        acc[j] = ([p + q * size[i] for p, q in zip(vec, x[i])], sz + size[i])
    survivors = [j for j in range(n) if j not in merged]
    out, out_size = [], []
    for j in survivors:
        if j in acc:
            vec, sz = acc[j]
            out.append([v / sz for v in vec])
            out_size.append(sz)
        else:
            out.append(x[j])
            out_size.append(size[j])
    slot = {j: s for s, j in enumerate(survivors)}
    assign = [slot[j] if j in slot else slot[best[j][1]] for j in range(n)]
    return out, out_size, assign


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# ----------------------------------------------------------------- gather / drop
def test_gather_tokens_and_drop_all():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    idx = torch.tensor([[0, 4], [1, 2]])
    assert torch.equal(gather_tokens(x, idx), torch.stack([x[0, [0, 4]], x[1, [1, 2]]]))
    assert torch.equal(gather_tokens(x, torch.tensor([3])), x[:, [3]])
    y = torch.randn(2, 5, 3, 4)
    assert torch.equal(gather_tokens(y, idx)[1], y[1, [1, 2]])
    assert drop_all(x).shape == (2, 0, 3)


def test_gather_tokens_every_layout_against_a_loop():
    """Batch 1, batch 3, and a non-contiguous (expanded) input all copy the same rows as a
    plain per-sample loop."""
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(1, 7, 4, generator=g), torch.randn(3, 7, 4, generator=g),
              torch.randn(1, 7, 4, generator=g).expand(3, 7, 4), torch.randn(3, 4, 7, generator=g).transpose(1, 2)):
        b = x.shape[0]
        idx = torch.stack([torch.randperm(7, generator=g)[:5] for _ in range(b)])
        want = [[x[i, j].tolist() for j in idx[i].tolist()] for i in range(b)]
        assert gather_tokens(x, idx).tolist() == want


def test_gather_tokens_refuses_indices_of_another_sample():
    x = torch.randn(2, 5, 3)
    with pytest.raises(IndexError):
        gather_tokens(x, torch.tensor([[0, 5], [1, 2]]))  # 5 would be sample 1's row 0
    with pytest.raises(IndexError):
        gather_tokens(x, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError):
        gather_tokens(x, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError):
        gather_tokens(torch.randn(1, 5, 3), torch.tensor([[0, 1], [2, 3]]))


def test_scatter_rows_equals_scatter_add_and_checks_rows():
    from vtdsl.ops.merge import _scatter_rows

    g = torch.Generator().manual_seed(4)
    dst = torch.randn(2, 6, 3, generator=g)
    index = torch.tensor([[0, 0, 5, 2], [1, 3, 3, 3]])
    src = torch.randn(2, 4, 3, generator=g)
    want = dst.clone()
    for b in range(2):
        for i, row in enumerate(index[b].tolist()):
            for c in range(3):
                want[b, row, c] += src[b, i, c]
    assert torch.allclose(_scatter_rows(dst.clone(), index, src), want, atol=1e-6)
    with pytest.raises(IndexError):
        _scatter_rows(torch.zeros(2, 3, 1), torch.tensor([[3], [0]]), torch.ones(2, 1, 1))


# ----------------------------------------------------------------- merge_rest
@pytest.mark.parametrize("mode", ["mean", "visionzip"])
def test_merge_rest_matches_reference(mode):
    g = torch.Generator().manual_seed(20)
    x = torch.randn(2, 17, 4, generator=g)
    metric = torch.randn(2, 17, 3, generator=g)
    kept = torch.tensor([[1, 5, 6, 12], [0, 2, 3, 16]])
    out, assign = merge_rest(x, kept, 4, metric=metric, mode=mode)
    assert out.shape == (2, 8, 4)
    for b in range(2):
        want, want_assign = ref_merge_rest(x[b].tolist(), kept[b].tolist(), 4, metric[b].tolist(), mode)
        assert close(out[b], want)
        assert assign[b].tolist() == want_assign
        rest = [j for j in range(17) if j not in kept[b].tolist()]
        assert contextual_targets(kept, 17, 4)[b].tolist() == [rest[i * (len(rest) // 4)] for i in range(4)]
    assert not torch.equal(assign[0], assign[1])


def test_merge_rest_uses_x_by_default_and_t_zero_drops():
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 9, 3, generator=g)
    kept = torch.tensor([[0, 1], [4, 8]])
    out, assign = merge_rest(x, kept, 3)
    for b in range(2):
        want, want_assign = ref_merge_rest(x[b].tolist(), kept[b].tolist(), 3)
        assert close(out[b], want) and assign[b].tolist() == want_assign
    out0, assign0 = merge_rest(x, kept, 0)
    assert torch.equal(out0, gather_tokens(x, kept))
    assert assign0[0].tolist() == [0, 1] + [-1] * 7
    full, _ = merge_rest(x, kept, 7)  # every remaining token is its own target
    assert torch.equal(full[:, 2:], gather_tokens(x, torch.tensor([[2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 5, 6, 7]])))
    with pytest.raises(ValueError):
        merge_rest(x, kept, 8)


def test_merge_rest_tie_goes_to_lower_target():
    e = torch.eye(2)
    # kept: 0; rest 1..6, t=2 -> step 3 -> targets 1, 4; token 3 equally similar to both
    x = torch.stack([e[0], e[0], e[1], e[0] + e[1], e[0], e[1], e[1]])[None].repeat(2, 1, 1)
    _, assign = merge_rest(x, torch.tensor([[0], [0]]), 2)
    assert assign[0, 3].item() == 1  # slot of target 1 (the lower one)


def test_merge_rest_half_precision_accumulates_in_float32():
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 12, 4, generator=g)
    kept = torch.tensor([[0, 1, 2], [3, 4, 5]])
    out_h, a_h = merge_rest(x.half(), kept, 3)
    out_f, a_f = merge_rest(x.half().float(), kept, 3)
    assert out_h.dtype == torch.float16
    assert torch.equal(a_h, a_f) and torch.allclose(out_h.float(), out_f, atol=1e-3)


# ----------------------------------------------------------------- bipartite
@pytest.mark.parametrize("n,r,protect", [(10, 3, False), (11, 4, True), (8, 4, False)])
def test_bipartite_merge_matches_reference(n, r, protect):
    g = torch.Generator().manual_seed(23 + n)
    x = torch.randn(2, n, 5, generator=g)
    size = torch.randint(1, 4, (2, n, 1), generator=g).float()
    out, out_size, assign = bipartite_merge(x, r, size=size, protect_first=protect, return_assign=True)
    assert out.shape == (2, n - r, 5) and out_size.shape == (2, n - r, 1)
    for b in range(2):
        want, want_size, want_assign = ref_bipartite(x[b].tolist(), r, size[b, :, 0].tolist(), protect)
        assert close(out[b], want)
        assert out_size[b, :, 0].tolist() == want_size
        assert assign[b].tolist() == want_assign
    assert torch.isclose(out_size.sum(), size.sum())
    if protect:
        assert torch.all(assign[:, 0] == 0)


def test_bipartite_merge_ties_and_edges():
    e = torch.eye(3)
    # A = 0,2,4; B = 1,3,5. token 2 is equally similar to B 1 and B 3 -> lower (1).
    # A 0 and A 4 both have similarity 1: with r=1 the lower A (0) merges.
    x = torch.stack([e[0], e[0], e[0] + e[1], e[1], e[2], e[2]])[None]
    _, _, assign = bipartite_merge(x, 1, return_assign=True)
    assert assign[0].tolist() == [0, 0, 1, 2, 3, 4]
    _, _, assign = bipartite_merge(x, 3, return_assign=True)
    assert assign[0].tolist() == [0, 0, 0, 1, 2, 2]
    same, size = bipartite_merge(x, 0)
    assert torch.equal(same, x) and torch.all(size == 1)
    with pytest.raises(ValueError):
        bipartite_merge(x, 4)


# ----------------------------------------------------------------- pool
def test_pool2d_matches_reference_ceil_mode():
    g = torch.Generator().manual_seed(24)
    rows, cols, d = 5, 7, 3
    x = torch.randn(2, rows * cols, d, generator=g)
    for kr, kc in ((2, 2), (2, 3), (5, 1), (6, 8)):
        out = pool2d(x, (rows, cols), kr, kc)
        pr, pc = pooled_grid((rows, cols), kr, kc)
        assert out.shape == (2, pr * pc, d)
        for b in range(2):
            want = []
            for R in range(pr):
                for C in range(pc):
                    cells = [
                        x[b, r * cols + c].tolist()
                        for r in range(R * kr, min((R + 1) * kr, rows))
                        for c in range(C * kc, min((C + 1) * kc, cols))
                    ]
                    want.append(vmean(cells))
            assert close(out[b], want)
    with pytest.raises(ValueError):
        pool2d(x[:, :-1], (rows, cols), 2, 2)


def test_merges_are_deterministic_and_batch_invariant():
    g = torch.Generator().manual_seed(25)
    x = torch.randn(3, 14, 6, generator=g)
    kept = torch.tensor([[0, 3], [1, 9], [2, 13]])
    a = merge_rest(x, kept, 4)
    assert all(torch.equal(p, q) for p, q in zip(a, merge_rest(x, kept, 4)))
    solo = merge_rest(x[2:], kept[2:], 4)
    assert torch.allclose(solo[0][0], a[0][2]) and torch.equal(solo[1][0], a[1][2])
    m = bipartite_merge(x, 5, return_assign=True)
    solo_m = bipartite_merge(x[1:2], 5, return_assign=True)
    assert torch.allclose(solo_m[0][0], m[0][1]) and torch.equal(solo_m[2][0], m[2][1])
