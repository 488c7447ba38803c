"""Selectors and the keep-union against plain-Python references (loops over lists)."""

from __future__ import annotations

import math

import pytest
import torch

from vtdsl.ops.keep import TermSpec, select_union
from vtdsl.ops.select import (
    buffers,
    diverse,
    neighbour_mask,
    per_region,
    random,
    split_regions,
    topk,
    uniform,
    unique,
)


# ----------------------------------------------------------------- python references
def ref_topk(scores, k, exclude=None):
    n = len(scores)
    ex = exclude or [False] * n
    order = sorted(range(n), key=lambda j: (ex[j], -scores[j], j))
    return sorted(order[:k])


def ref_cos(u, v):
    nu = max(math.sqrt(sum(a * a for a in u)), 1e-12)
    nv = max(math.sqrt(sum(a * a for a in v)), 1e-12)
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def ref_greedy(feats, k, seeds=(), exclude=(), start="isolated"):
    """Greedy least-similar-to-kept selection with DivPrune / central first pick."""
    n = len(feats)
    sim = [[ref_cos(feats[i], feats[j]) for j in range(n)] for i in range(n)]
    kept = list(seeds)
    avail = [j for j in range(n) if j not in seeds and j not in exclude]
    picks = []
    for step in range(k):
        if not kept:
            if start == "isolated":  # farthest nearest-neighbour among candidates
                def key(j):
                    others = [sim[i][j] for i in avail if i != j]
                    return -(max(others) if others else -math.inf)
            else:  # highest mean similarity to the other candidates
                def key(j):
                    others = [sim[i][j] for i in avail if i != j]
                    return sum(others) / max(len(others), 1)
        else:
            def key(j):
                return -max(sim[i][j] for i in kept)
        best = max(avail, key=lambda j: (key(j), -j))
        picks.append(best)
        kept.append(best)
        avail.remove(best)
    return sorted(picks)


def ref_uniform(mask, k):
    cands = [j for j, m in enumerate(mask) if m]
    return [cands[(i * len(cands)) // k] for i in range(k)]


def ref_neighbours(kept, positions, grid):
    rows, cols = grid
    cells = {positions[j]: j for j in range(len(kept)) if 0 <= positions[j] < rows * cols}
    out = set()
    for j, kp in enumerate(kept):
        if not kp or not (0 <= positions[j] < rows * cols):
            continue
        r, c = divmod(positions[j], cols)
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < rows and 0 <= cc < cols and rr * cols + cc in cells:
                t = cells[rr * cols + cc]
                if not kept[t]:
                    out.add(t)
    return out


def ref_buffers(kept, positions, grid, k, scores=None, exclude=None):
    n = len(kept)
    scores = scores or [0.0] * n
    ex = exclude or [False] * n
    nb = ref_neighbours(kept, positions, grid)

    def group(j):
        if kept[j] or ex[j]:
            return 2
        return 0 if j in nb else 1

    order = sorted(range(n), key=lambda j: (group(j), -scores[j], j))
    return sorted(order[:k])


def ref_regions(positions, grid, rows, cols):
    big_r, big_c = grid
    out = []
    for p in positions:
        if p < 0:
            out.append(-1)
            continue
        r, c = divmod(p, big_c)
        out.append((r * rows // big_r) * cols + (c * cols // big_c))
    return out


def rows_of(t):
    return [row.tolist() for row in t]


# ----------------------------------------------------------------- top-k
def test_topk_matches_reference_with_exclude():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(3, 12, generator=g)
    ex = torch.rand(3, 12, generator=g) > 0.6
    got = topk(s, 4, exclude=ex)
    for b in range(3):
        assert got[b].tolist() == ref_topk(s[b].tolist(), 4, ex[b].tolist())
    assert len({tuple(r) for r in rows_of(got)}) == 3


def test_topk_ties_lower_position_wins_and_nan_is_lowest():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert topk(s, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    ex = torch.zeros(2, 6, dtype=torch.bool)
    ex[:, 1] = True
    assert topk(s, 3, exclude=ex).tolist() == [[2, 4, 5], [0, 2, 3]]
    s2 = torch.tensor([[float("nan"), 1.0, -5.0], [2.0, float("nan"), 1.0]])
    assert topk(s2, 2).tolist() == [[1, 2], [0, 2]]
    # excluded tokens lose even against -inf scores
    s3 = torch.tensor([[float("-inf"), 5.0, 4.0]])
    assert topk(s3, 2, exclude=torch.tensor([[False, True, False]])).tolist() == [[0, 2]]


def test_topk_errors_and_empty():
    s = torch.randn(2, 4)
    assert topk(s, 0).shape == (2, 0)
    with pytest.raises(ValueError):
        topk(s, 5)
    with pytest.raises(ValueError):
        topk(s, 3, exclude=torch.tensor([[True, True, False, False], [False] * 4]))


# ----------------------------------------------------------------- diverse / unique
@pytest.mark.parametrize("fn,start", [(diverse, "isolated"), (unique, "central")])
def test_greedy_similarity_selectors_match_reference(fn, start):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 14, 5, generator=g)
    got = fn(x, 5)
    for b in range(3):
        assert got[b].tolist() == ref_greedy(x[b].tolist(), 5, start=start)
    assert len({tuple(r) for r in rows_of(got)}) == 3


@pytest.mark.parametrize("fn,start", [(diverse, "isolated"), (unique, "central")])
def test_greedy_similarity_selectors_with_seeds_and_exclude(fn, start):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 12, 4, generator=g)
    seeds = torch.zeros(2, 12, dtype=torch.bool)
    seeds[0, [2, 7]] = True  # sample 1 has no seed: uses the first-pick rule
    ex = torch.zeros(2, 12, dtype=torch.bool)
    ex[0, [0, 1]] = True
    ex[1, [5, 9, 10]] = True
    got = fn(x, 4, seed_mask=seeds, exclude=ex)
    assert got[0].tolist() == ref_greedy(x[0].tolist(), 4, seeds=[2, 7], exclude=[0, 1], start=start)
    assert got[1].tolist() == ref_greedy(x[1].tolist(), 4, exclude=[5, 9, 10], start=start)


def test_diverse_and_unique_tie_breaks():
    # axis-aligned features: every cosine is exactly 0 or 1
    e = torch.eye(4)
    x = torch.stack([e[[0, 1, 0, 2, 3, 3]], e[[1, 1, 2, 2, 3, 0]]])
    # diverse starts from an isolated token (no duplicate), lowest index among them
    assert diverse(x, 1).tolist() == [[1], [4]]
    assert diverse(x, 4).tolist() == [[0, 1, 3, 4], [0, 2, 4, 5]]
    # unique starts from the most central token (highest mean similarity), then dedups
    assert unique(x, 1).tolist() == [[0], [0]]
    assert unique(x, 4).tolist() == [[0, 1, 3, 4], [0, 2, 4, 5]]


def test_diverse_shared_sim_equals_features():
    from vtdsl.ops.similarity import pairwise_cosine

    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 10, 6, generator=g)
    assert torch.equal(diverse(x, 4), diverse(None, 4, sim=pairwise_cosine(x)))
    assert torch.equal(diverse(x.half(), 4), diverse(x.half().float(), 4))
    with pytest.raises(ValueError):
        diverse(x, 11)


# ----------------------------------------------------------------- uniform / random
def test_uniform_matches_formula_per_sample():
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[0, [0, 3, 4, 11]] = False
    mask[1, 10:] = False
    got = uniform(mask, 6)
    for b in range(3):
        assert got[b].tolist() == ref_uniform(mask[b].tolist(), 6)
    assert uniform(torch.ones(1, 16, dtype=torch.bool), 4).tolist() == [[0, 4, 8, 12]]
    assert uniform(mask, 0).shape == (3, 0)
    with pytest.raises(ValueError):
        uniform(mask, 11)


def test_random_is_seeded_independent_and_within_candidates():
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[:, ::3] = False
    a = random(mask, 8, seed=7)
    assert torch.equal(a, random(mask, 8, seed=7))
    assert not torch.equal(a, random(mask, 8, seed=8))
    assert len({tuple(r) for r in rows_of(a)}) == 3  # each sample its own draw
    for row in rows_of(a):
        assert row == sorted(set(row)) and all(j % 3 for j in row)
    # reference: keys from a CPU generator with that seed, k smallest among candidates
    gen = torch.Generator().manual_seed(7)
    keys = torch.rand(3, 30, generator=gen).tolist()
    for b in range(3):
        cands = sorted((keys[b][j], j) for j in range(30) if mask[b, j])
        assert a[b].tolist() == sorted(j for _, j in cands[:8])
    # a sample's draw does not depend on the batch size
    assert torch.equal(random(mask[:1], 8, seed=7)[0], a[0])


# ----------------------------------------------------------------- buffers / regions
def test_neighbours_and_buffers_match_reference_no_wrap():
    g = torch.Generator().manual_seed(14)
    grid = (4, 5)
    positions = torch.arange(20)
    kept = torch.zeros(2, 20, dtype=torch.bool)
    kept[0, [4, 12]] = True  # 4 = end of row 0: 5 (next row start) is NOT a neighbour
    kept[1, [0, 19]] = True
    scores = torch.randn(2, 20, generator=g)
    nb = neighbour_mask(kept, positions, grid)
    for b in range(2):
        assert set(nb[b].nonzero().flatten().tolist()) == ref_neighbours(kept[b].tolist(), list(range(20)), grid)
    assert not nb[0, 5]
    for k in (2, 6, 9):  # fewer, equal-ish, more than the neighbours -> padding
        got = buffers(kept, positions, grid, k, order_scores=scores)
        for b in range(2):
            assert got[b].tolist() == ref_buffers(kept[b].tolist(), list(range(20)), grid, k, scores[b].tolist())


def test_buffers_with_sparse_positions_and_ties():
    # tokens present after an earlier prune: positions are a subset of the 3x3 grid
    positions = torch.tensor([[0, 1, 3, 4, 8, -1], [1, 2, 4, 5, 7, -1]])
    kept = torch.tensor([[False, False, False, True, False, False], [False, False, True, False, False, False]])
    scores = torch.tensor([[1.0, 1.0, 1.0, 9.0, 1.0, 5.0], [2.0, 2.0, 9.0, 2.0, 2.0, 7.0]])
    got = buffers(kept, positions, (3, 3), 3, order_scores=scores)
    for b in range(2):
        assert got[b].tolist() == ref_buffers(
            kept[b].tolist(), positions[b].tolist(), (3, 3), 3, scores[b].tolist()
        )
    # sample 0: neighbours of grid 4 present = grid 1 (idx1), grid 3 (idx2); tie at 1.0 ->
    # position order; padding = best remaining = off-grid token 5 (score 5).
    # sample 1: grid 4 kept; present neighbours grid 1, 5, 7 (idx 0, 3, 4), no padding
    assert got.tolist() == [[1, 2, 5], [0, 3, 4]]


def test_split_regions_matches_reference():
    positions = torch.tensor([list(range(-1, 34)), list(range(34, -1, -1))])
    for rows, cols in ((2, 2), (3, 2), (1, 5)):
        got = split_regions(positions, (5, 7), rows, cols)
        for b in range(2):
            assert got[b].tolist() == ref_regions(positions[b].tolist(), (5, 7), rows, cols)
    assert split_regions(torch.arange(16), (4, 4), 2, 2).tolist() == [0, 0, 1, 1] * 2 + [2, 2, 3, 3] * 2


def test_per_region_even_split_with_shortfall_goes_to_global_best():
    g = torch.Generator().manual_seed(15)
    n = 16
    region = split_regions(torch.arange(n), (4, 4), 2, 2)[None].expand(2, -1)
    scores = torch.randn(2, n, generator=g)
    exclude = torch.zeros(2, n, dtype=torch.bool)
    exclude[0, [0, 1, 4]] = True  # region 0 of sample 0 keeps only token 5
    k = 10  # shares 3, 3, 2, 2

    def fn(c, allowed, taken, rows):
        return topk(scores[rows], c, exclude=~allowed)

    got = per_region(fn, k, region, 4, exclude=exclude)
    for b in range(2):
        s = scores[b].tolist()
        ex = exclude[b].tolist()
        picked = []
        for rg, share in enumerate((3, 3, 2, 2)):
            cands = [j for j in range(n) if region[b, j] == rg and not ex[j]]
            cands.sort(key=lambda j: (-s[j], j))
            picked += cands[:share]
        rest = [j for j in range(n) if j not in picked and not ex[j]]
        rest.sort(key=lambda j: (-s[j], j))
        picked += rest[: k - len(picked)]
        assert got[b].tolist() == sorted(picked)
    assert 5 in got[0].tolist()
    # the grouped path gives each sample what it gets alone
    assert torch.equal(per_region(lambda c, a, t, r: topk(scores[1:][r], c, exclude=~a), k, region[1:], 4), got[1:])


# ----------------------------------------------------------------- union
def test_select_union_matches_reference():
    g = torch.Generator().manual_seed(16)
    b, n, grid = 2, 20, (4, 5)
    s = torch.randn(b, n, generator=g)
    feats = torch.randn(b, n, 6, generator=g)
    exclude = torch.zeros(b, n, dtype=torch.bool)
    exclude[1, [3, 8]] = True
    terms = [
        TermSpec("top", 3, s),
        TermSpec("buffers", 4),
        TermSpec("diverse", 3),
        TermSpec("uniform", 2),
        TermSpec("unique", 2),
    ]
    got, term_of = select_union(
        terms, n=n, positions=torch.arange(n), grid=grid, features=feats, exclude=exclude, return_terms=True
    )
    assert got.shape == (b, 14)
    for i in range(b):
        ex = exclude[i].tolist()
        kept = ref_topk(s[i].tolist(), 3, ex)
        anchors = [j in kept for j in range(n)]
        buf = ref_buffers(anchors, list(range(n)), grid, 4, s[i].tolist(), ex)
        kept += buf
        div = ref_greedy(feats[i].tolist(), 3, seeds=kept, exclude=[j for j in range(n) if ex[j]])
        kept += div
        remaining = [j not in kept and not ex[j] for j in range(n)]
        uni = ref_uniform(remaining, 2)
        kept += uni
        unq = ref_greedy(feats[i].tolist(), 2, seeds=kept, exclude=[j for j in range(n) if ex[j]], start="central")
        kept += unq
        assert got[i].tolist() == sorted(kept)
        owner = {j: t for t, part in enumerate((kept[:3], buf, div, uni, unq)) for j in part}
        assert term_of[i].tolist() == [owner[j] for j in got[i].tolist()]
    assert not torch.equal(got[0], got[1])


def test_select_union_per_region_and_random_term():
    g = torch.Generator().manual_seed(17)
    n = 16
    s = torch.randn(2, n, generator=g)
    region = split_regions(torch.arange(n), (4, 4), 2, 2)
    terms = [TermSpec("top", 4, s), TermSpec("random", 4, seed=3)]
    got = select_union(terms, n=n, region_ids=region, num_regions=4)
    assert torch.equal(got, select_union(terms, n=n, region_ids=region, num_regions=4))
    counts = torch.zeros(2, 4, dtype=torch.long)
    for b in range(2):
        for j in got[b].tolist():
            counts[b, region[j]] += 1
    assert torch.all(counts == 2)  # 1 top + 1 random in every region
    for b in range(2):  # the top term picks each region's best
        for rg in range(4):
            cands = [j for j in range(n) if region[j] == rg]
            assert max(cands, key=lambda j: (s[b, j].item(), -j)) in got[b].tolist()


def test_select_union_is_batch_invariant_and_deterministic():
    g = torch.Generator().manual_seed(18)
    n = 12
    s = torch.randn(3, n, generator=g)
    feats = torch.randn(3, n, 4, generator=g)
    terms = [TermSpec("top", 2, s), TermSpec("diverse", 3), TermSpec("random", 2, seed=1)]
    full = select_union(terms, n=n, features=feats)
    assert torch.equal(full, select_union(terms, n=n, features=feats))
    solo = select_union(
        [TermSpec("top", 2, s[:1]), TermSpec("diverse", 3), TermSpec("random", 2, seed=1)], n=n, features=feats[:1]
    )
    assert torch.equal(solo[0], full[0])


def test_select_union_errors():
    with pytest.raises(ValueError):
        select_union([TermSpec("top", 2)], n=5, batch=1)
    with pytest.raises(ValueError):
        select_union([TermSpec("diverse", 2)], n=5, batch=1)
    with pytest.raises(ValueError):
        select_union([TermSpec("buffers", 2)], n=5, batch=1)
    assert select_union([TermSpec("uniform", 2)], n=5, batch=2).tolist() == [[0, 2], [0, 2]]
