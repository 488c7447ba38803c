"""Counted FLOPs of every op equal the formula in docs/dev/contracts.md.

torch's FlopCounterMode counts mm/bmm/matmul/einsum/addmm/conv/sdpa; elementwise ops,
sort/topk, gather/scatter and pooling are free. Formulas are per image; B images here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtdsl.ops.attention import attention_probs
from vtdsl.ops.keep import TermSpec, select_union
from vtdsl.ops.merge import bipartite_merge, drop_all, gather_tokens, merge_rest, pool2d
from vtdsl.ops.scores import attention_received, cls_attention, query_attention, token_norm
from vtdsl.ops.select import buffers, diverse, per_region, random, split_regions, topk, uniform, unique

B, N, H, DH, D = 2, 17, 4, 8, 32


def flops(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(30)
    return {
        "qp": torch.randn(B, N, H * DH, generator=g),
        "kp": torch.randn(B, N, H * DH, generator=g),
        "x": torch.randn(B, N, D, generator=g),
        "s": torch.randn(B, N, generator=g),
    }


def test_attention_scores_flops(data):
    qp, kp = data["qp"], data["kp"]
    assert flops(cls_attention, qp, kp, H) == B * 2 * 1 * N * H * DH
    assert flops(attention_received, qp, kp, H) == B * 2 * N * N * H * DH
    # LLM: last text row against all keys with GQA (2 KV heads): still 2·m·n·H·dh
    q = torch.randn(B, H, 1, DH)
    k = torch.randn(B, 2, N, DH)
    assert flops(query_attention, q, k, torch.arange(3, 9)) == B * 2 * 1 * N * H * DH
    q_text = torch.randn(B, H, 5, DH)
    pos = torch.arange(12, 17)
    assert flops(query_attention, q_text, k, torch.arange(3, 9), query_positions=pos) == B * 2 * 5 * N * H * DH
    assert flops(attention_probs, q, k, head_reduce="max") == B * 2 * N * H * DH
    assert flops(token_norm, data["x"]) == 0


def test_similarity_selectors_flops(data):
    x = data["x"]
    assert flops(diverse, x, 5) == B * 2 * N * N * D
    assert flops(unique, x, 5) == B * 2 * N * N * D


def test_score_free_selectors_have_no_counted_flops(data):
    s = data["s"]
    mask = torch.ones(B, N, dtype=torch.bool)
    kept = torch.zeros(B, N, dtype=torch.bool)
    kept[:, 3] = True
    positions = torch.arange(16).tolist() + [-1]
    positions = torch.tensor(positions)
    region = split_regions(positions, (4, 4), 2, 2)[None].expand(B, -1)
    assert flops(topk, s, 5) == 0
    assert flops(uniform, mask, 5) == 0
    assert flops(random, mask, 5, seed=1) == 0
    assert flops(buffers, kept, positions, (4, 4), 5, order_scores=s) == 0
    assert flops(per_region, lambda c, a, t, r: topk(s[r], c, exclude=~a), 6, region, 4) == 0


def test_union_computes_one_cosine_matrix_per_stage(data):
    x, s = data["x"], data["s"]
    terms = [TermSpec("top", 2, s), TermSpec("diverse", 3), TermSpec("unique", 2), TermSpec("uniform", 1)]
    assert flops(select_union, terms, n=N, features=x) == B * 2 * N * N * D
    assert flops(select_union, [TermSpec("top", 2, s), TermSpec("random", 2, seed=0)], n=N) == 0


def test_merge_flops(data):
    x = data["x"]
    kept = torch.tensor([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]])
    k, t = 5, 4
    r = N - k
    assert flops(merge_rest, x, kept, t) == B * 2 * (r - t) * t * D
    metric = torch.randn(B, N, DH)
    assert flops(merge_rest, x, kept, t, metric=metric) == B * 2 * (r - t) * t * DH
    n_a, n_b = (N + 1) // 2, N // 2
    assert flops(bipartite_merge, x, 4) == B * 2 * n_a * n_b * D
    grid_x = torch.randn(B, 16, D)
    assert flops(pool2d, grid_x, (4, 4), 3, 3) == 0
    assert flops(gather_tokens, x, kept) == 0
    assert flops(drop_all, x) == 0
