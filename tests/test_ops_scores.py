"""Attention and score ops against plain-Python references (loops over lists)."""

from __future__ import annotations

import math

import pytest
import torch

from vtdsl.ops.attention import attention_probs, repeat_kv, split_heads
from vtdsl.ops.scores import attention_received, cls_attention, query_attention, token_norm


# ----------------------------------------------------------------- python references
def ref_softmax(row):
    finite = [v for v in row if v != -math.inf]
    if not finite:
        return [0.0] * len(row)
    mx = max(finite)
    ex = [0.0 if v == -math.inf else math.exp(v - mx) for v in row]
    s = sum(ex)
    return [e / s for e in ex]


def ref_attention(q, k, mask=None, reduce="mean"):
    """q: [B][H][m][dh] lists, k: [B][Hkv][n][dh]; mask[b][i][j] bool (True = attend)."""
    out = []
    for b in range(len(q)):
        heads = len(q[b])
        group = heads // len(k[b])
        rows = []
        for i in range(len(q[b][0])):
            per_head = []
            for h in range(heads):
                kk = k[b][h // group]
                dh = len(q[b][h][i])
                logits = []
                for j in range(len(kk)):
                    v = sum(q[b][h][i][e] * kk[j][e] for e in range(dh)) / math.sqrt(dh)
                    if mask is not None and not mask[b][i][j]:
                        v = -math.inf
                    logits.append(v)
                per_head.append(ref_softmax(logits))
            n = len(per_head[0])
            if reduce == "mean":
                rows.append([sum(p[j] for p in per_head) / heads for j in range(n)])
            elif reduce == "sum":
                rows.append([sum(p[j] for p in per_head) for j in range(n)])
            else:
                rows.append([max(p[j] for p in per_head) for j in range(n)])
        out.append(rows)
    return out


def heads_of(proj, num_heads):
    """[B][n][H*dh] -> [B][H][n][dh] with python lists."""
    out = []
    for sample in proj:
        width = len(sample[0])
        dh = width // num_heads
        out.append([[tok[h * dh:(h + 1) * dh] for tok in sample] for h in range(num_heads)])
    return out


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol)


# ----------------------------------------------------------------- tests
def test_split_heads_and_repeat_kv_layout():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)
    h = split_heads(x, 4)
    assert h.shape == (2, 4, 3, 2)
    assert torch.equal(h[1, 2, 0], x[1, 0, 4:6])
    k = torch.randn(2, 2, 5, 3)
    r = repeat_kv(k, 3)
    assert r.shape == (2, 6, 5, 3)
    for h in range(6):  # query head h reads key head h // n_rep
        assert torch.equal(r[:, h], k[:, h // 3])
    with pytest.raises(ValueError):
        split_heads(x, 3)


@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_attention_probs_matches_reference_with_gqa_and_mask(reduce):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 5, generator=g)
    k = torch.randn(2, 2, 6, 5, generator=g)
    mask = torch.rand(2, 1, 3, 6, generator=g) > 0.3
    mask[1, 0, 2] = False  # a fully masked row -> zeros
    got = attention_probs(q, k, mask=mask, head_reduce=reduce)
    want = ref_attention(q.tolist(), k.tolist(), mask[:, 0].tolist(), reduce)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 6)
    assert close(got, want)
    assert torch.all(got[1, 2] == 0)
    assert not torch.allclose(got[0], got[1])


def test_attention_probs_additive_mask_equals_boolean_and_gqa_equals_repeat():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 2, 8, generator=g)
    k = torch.randn(2, 2, 7, 8, generator=g)
    allowed = torch.rand(2, 1, 2, 7, generator=g) > 0.4
    allowed[..., 0] = True
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    a = attention_probs(q, k, mask=allowed)
    b = attention_probs(q, k, mask=additive)
    c = attention_probs(q, repeat_kv(k, 2), mask=allowed)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_attention_probs_half_inputs_score_in_float32():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 1, 4, generator=g)
    k = torch.randn(2, 2, 5, 4, generator=g)
    out = attention_probs(q.half(), k.half())
    assert out.dtype == torch.float32
    assert torch.allclose(out, attention_probs(q.half().float(), k.half().float()))


def test_cls_attention_matches_reference():
    g = torch.Generator().manual_seed(4)
    b, n, h, dh = 2, 7, 3, 4
    qp = torch.randn(b, n, h * dh, generator=g)
    kp = torch.randn(b, n, h * dh, generator=g)
    got = cls_attention(qp, kp, h)
    qh, kh = heads_of(qp.tolist(), h), heads_of(kp.tolist(), h)
    want = ref_attention([[qh[s][hh][:1] for hh in range(h)] for s in range(b)], kh)
    assert got.shape == (b, n - 1)
    assert close(got, [want[s][0][1:] for s in range(b)])
    assert got.argmax(1)[0] != got.argmax(1)[1] or not torch.allclose(got[0], got[1])
    summed = cls_attention(qp, kp, h, head_reduce="sum")
    assert torch.allclose(summed, got * h, atol=1e-6)


def test_attention_received_matches_reference():
    g = torch.Generator().manual_seed(5)
    b, n, h, dh = 2, 6, 2, 3
    qp = torch.randn(b, n, h * dh, generator=g)
    kp = torch.randn(b, n, h * dh, generator=g)
    got = attention_received(qp, kp, h)
    att = ref_attention(heads_of(qp.tolist(), h), heads_of(kp.tolist(), h))
    want = [[sum(att[s][i][j] for i in range(n)) / n for j in range(n)] for s in range(b)]
    assert close(got, want)
    assert close(attention_received(qp, kp, h, key_index=slice(1, None)), [w[1:] for w in want])
    assert not torch.equal(got.argsort(1)[0], got.argsort(1)[1])


def test_query_attention_causal_positions_and_key_index():
    g = torch.Generator().manual_seed(6)
    b, h, hkv, n, dh = 2, 4, 2, 8, 4
    q = torch.randn(b, h, 3, dh, generator=g)
    k = torch.randn(b, hkv, n, dh, generator=g)
    qpos = torch.tensor([[1, 5, 7], [2, 6, 7]])
    key_index = torch.tensor([[2, 3, 4], [1, 3, 5]])
    got = query_attention(q, k, key_index, query_positions=qpos)
    causal = [[[j <= qpos[s, i].item() for j in range(n)] for i in range(3)] for s in range(b)]
    att = ref_attention(q.tolist(), k.tolist(), causal)
    want = [[sum(att[s][i][j] for i in range(3)) / 3 for j in key_index[s].tolist()] for s in range(b)]
    assert close(got, want)
    # query at position 1 sees nothing of keys 2.. : with only that row the image columns are 0
    only_first = query_attention(q[:, :, :1], k, key_index, query_positions=qpos[:, :1])
    assert torch.all(only_first[0] == 0)


def test_query_attention_softmax_over_selected_keys():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 2, 1, 4, generator=g)
    k = torch.randn(2, 2, 6, 4, generator=g)
    cols = torch.tensor([1, 2, 4])
    got = query_attention(q, k, cols, softmax_over="selected")
    allowed = [[[j in (1, 2, 4) for j in range(6)]] for _ in range(2)]
    att = ref_attention(q.tolist(), k.tolist(), allowed)
    assert close(got, [[att[s][0][j] for j in (1, 2, 4)] for s in range(2)])
    assert torch.allclose(got.sum(1), torch.ones(2))


def test_token_norm():
    x = torch.tensor([[[3.0, 4.0], [0.0, -2.0]], [[1.0, 1.0], [6.0, 8.0]]])
    assert torch.allclose(token_norm(x), torch.tensor([[5.0, 2.0], [math.sqrt(2), 10.0]]))
    assert torch.allclose(token_norm(x, p=1), torch.tensor([[7.0, 2.0], [2.0, 14.0]]))
    assert token_norm(x.half()).dtype == torch.float32


def test_scores_are_deterministic():
    g = torch.Generator().manual_seed(8)
    qp = torch.randn(2, 9, 8, generator=g)
    kp = torch.randn(2, 9, 8, generator=g)
    assert torch.equal(cls_attention(qp, kp, 2), cls_attention(qp, kp, 2))
    assert torch.equal(attention_received(qp, kp, 2), attention_received(qp, kp, 2))
    # batch invariance: a sample's score does not depend on its batch mates
    assert torch.allclose(cls_attention(qp[1:], kp[1:], 2)[0], cls_attention(qp, kp, 2)[1], atol=1e-7)
