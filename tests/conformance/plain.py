"""Plain-torch plumbing the conformance references share: the uncompiled tiny LLaVA run by
hand (CLIP blocks, projector, LLaMA layers at explicit positions). The authors' code
patches these same steps; running them here lets a reference cut tokens exactly where
the authors do. Nothing here imports vtdsl."""

from __future__ import annotations

import math

import torch


def vit(model, px: torch.Tensor):
    """The plain vision tower's run: every layer's attention and hidden state."""
    with torch.no_grad():
        return model.model.vision_tower(px, output_attentions=True, output_hidden_states=True)


def clip_attention(layer, h: torch.Tensor, size: torch.Tensor | None = None):
    """A CLIP block's attention on its input h: (probs, q, k, v), each ``[B, H, n, ·]``;
    with `size`, ToMe's proportional attention (log size added to the logits)."""
    attn = layer.self_attn
    x = layer.layer_norm1(h)
    b, n, _ = x.shape

    def heads(t):
        return t.view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(-1), q, k, v


def clip_block(layer, h: torch.Tensor, size: torch.Tensor | None = None, mid=None):
    """One CLIP block by hand: (output, probs, k, v, size). `mid(x, k)` may replace the
    residual stream between attention and MLP (ToMe merges there) and returns (x, size)."""
    probs, _, k, v = clip_attention(layer, h, size)
    b, _, n, _ = v.shape
    x = h + layer.self_attn.out_proj((probs @ v).transpose(1, 2).reshape(b, n, -1))
    if mid is not None:
        x, size = mid(x, k)
    x = x + layer.mlp(layer.layer_norm2(x))
    return x, probs, k, v, size


def project(model, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.model.multi_modal_projector(feats)


def embeds(model, ids: torch.Tensor, image_token_id: int, visual: torch.Tensor) -> torch.Tensor:
    """Input embeddings of the 1-sample prompt `ids` whose image rows become `visual`
    (``[n, d]``): the rows may be fewer than the placeholders (a cut before the LLM)."""
    rows = (ids[0] == image_token_id).nonzero().flatten()
    start = int(rows[0])
    with torch.no_grad():
        text = model.get_input_embeddings()(ids[0])
    return torch.cat([text[:start], visual, text[int(rows[-1]) + 1:]])[None]


def causal(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def decoder(model, idx: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """LLaMA layer idx on h (all rows attend causally) at RoPE positions `pos` ``[n]``."""
    lm = model.model.language_model
    with torch.no_grad():
        return lm.layers[idx](h, attention_mask=causal(h.shape[1], h.dtype), position_ids=pos[None],
                              position_embeddings=lm.rotary_emb(h, pos[None]))


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def qk(model, idx: int, h: torch.Tensor, pos: torch.Tensor | None):
    """LLaMA layer idx's queries and keys on h (its input norm and projections), keys
    repeated to every query head: ``[B, H, n, dh]`` each; RoPE at `pos`, none if None."""
    lm = model.model.language_model
    attn = lm.layers[idx].self_attn
    with torch.no_grad():
        x = lm.layers[idx].input_layernorm(h)
        b, n, _ = x.shape
        q = attn.q_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, -1, attn.head_dim).transpose(1, 2)
        if pos is not None:
            cos, sin = lm.rotary_emb(x, pos[None])
            cos, sin = cos[:, None], sin[:, None]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    return q, k.repeat_interleave(attn.num_key_value_groups, dim=1)


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, causal_rows: bool = True) -> torch.Tensor:
    """Softmax attention of query `rows` over all keys (masked causally), ``[B, H, r, n]``."""
    logits = (q[:, :, rows] @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal_rows:
        cols = torch.arange(k.shape[2])
        logits = logits.masked_fill(cols[None, :] > rows[:, None], torch.finfo(logits.dtype).min)
    return logits.softmax(-1)


def video_embeddings(model, inputs) -> torch.Tensor:
    """A Qwen-VL video's merged embeddings ``[F·N, d]`` from the plain model: what the
    video methods compress before the LLM."""
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return out.pooler_output[0]


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def lof_outliers(values: list[float], k: int) -> int:
    """How many of `values` (1-D samples) scikit-learn's ``LocalOutlierFactor(
    n_neighbors=k, contamination="auto")`` calls outliers, from the definition (Breunig et
    al. 2000, as sklearn/neighbors/_lof.py computes it): each sample's k nearest others
    (k = min(k, n - 1)), reach(p, o) = max(k-distance(o), |p - o|), lrd(p) = 1 / (mean
    reach + 1e-10), LOF(p) = mean of lrd(o) / lrd(p); an outlier when LOF > 1.5."""
    n = len(values)
    k = min(k, n - 1)
    neighbours, kdist = [], []
    for i, x in enumerate(values):
        others = sorted((abs(x - y), j) for j, y in enumerate(values) if j != i)[:k]
        neighbours.append([j for _, j in others])
        kdist.append(others[-1][0])
    lrd = []
    for i, x in enumerate(values):
        reach = [max(kdist[j], abs(x - values[j])) for j in neighbours[i]]
        lrd.append(1.0 / (sum(reach) / k + 1e-10))
    lof = [sum(lrd[j] for j in neighbours[i]) / k / lrd[i] for i in range(n)]
    return sum(1 for f in lof if f > 1.5)
