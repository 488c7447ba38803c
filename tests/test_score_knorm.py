"""`knorm`: the L1 norm of a token's attention key over all heads (DART's pivots): in the
LLM the key as the cache holds it (RoPE applied, unless `no_rope`), in the ViT the key
projection. References recompute it from the HF modules' own outputs, with RoPE written
out by hand."""

from __future__ import annotations

import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.models import get_spec

from plain_refs import first_error

SPEC = get_spec("tiny-llava")
IMG = SPEC.image_token_id


@pytest.fixture(scope="module")
def model():
    return SPEC.build(device="cpu", attn_implementation="eager", seed=0).eval()


def prompt():
    ids = torch.tensor([[5, 6, 7] + [IMG] * 576 + [8, 9, 10]])
    return ids, torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(4))


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's RoPE on ``[n, heads, dh]`` keys with ``[n, dh]`` cos / sin."""
    half = k.shape[-1] // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return k * cos[:, None] + rotated * sin[:, None]


def llm_key_norms(model, ids, px, layer: int, rope: bool) -> torch.Tensor:
    seen = {}
    lm = model.model.language_model
    h1 = lm.layers[layer].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(k=out[0]))
    h2 = lm.layers[layer].register_forward_pre_hook(
        lambda m, a, kw: seen.update(pe=kw["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=px)
    h1.remove()
    h2.remove()
    dh = SPEC.llm.head_dim
    k = seen["k"].view(ids.shape[1], -1, dh)
    if rope:
        cos, sin = seen["pe"]
        k = rotate(k, cos[0], sin[0])
    return k.abs().sum((1, 2))


@pytest.mark.parametrize("rope", [True, False])
def test_llm_knorm_keeps_the_largest_key_norms(model, rope):
    ids, px = prompt()
    norms = llm_key_norms(model, ids, px, layer=1, rope=rope)
    image = (ids[0] == IMG).nonzero().flatten()
    order = torch.argsort(norms[image], descending=True)
    assert (norms[image][order[3]] - norms[image][order[4]]).item() > 1e-5
    want = image[order[:4]].sort().values
    src = f"at llm.layer2 keep knorm{'' if rope else '(no_rope)'} top 4 + uniform 20"
    with vc.apply(src, model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        kept = vc.kept_tokens(model)["llm.layer2#0"][0]
    assert set(want.tolist()) <= set(kept.tolist())
    # the four pivots come first in the union: `knorm top 4` alone keeps exactly them
    with vc.apply(f"at llm.layer2 keep knorm{'' if rope else '(no_rope)'} top 4", model), torch.no_grad():
        model(input_ids=ids, pixel_values=px)
        assert torch.equal(vc.kept_tokens(model)["llm.layer2#0"][0], want)


def test_rope_changes_the_llm_ranking(model):
    ids, px = prompt()
    image = (ids[0] == IMG).nonzero().flatten()
    with_rope = llm_key_norms(model, ids, px, 1, True)[image].topk(16).indices
    without = llm_key_norms(model, ids, px, 1, False)[image].topk(16).indices
    assert set(with_rope.tolist()) != set(without.tolist())


def test_vit_knorm_reads_the_key_projection(model):
    ids, px = prompt()
    seen = {}
    hook = model.model.vision_tower.encoder.layers[20].self_attn.k_proj.register_forward_hook(
        lambda m, a, out: seen.update(k=out))
    with torch.no_grad():
        model.model.vision_tower(px)
    hook.remove()
    norms = seen["k"][0, 1:].abs().sum(-1)  # patches: CLS is row 0
    want = (norms.topk(16).indices.sort().values + 1).tolist()  # vid = 1 + patch index
    short = torch.tensor([[5, 6, 7] + [IMG] * 16 + [8, 9, 10]])
    with vc.apply("at vit.out keep knorm@vit.layer20 top 16", model), torch.no_grad():
        model(input_ids=short, pixel_values=px)
        assert vc.kept_tokens(model)["vit.out#0"][0].tolist() == want


@pytest.mark.parametrize("src, at, words", [
    ("at llm.layer2 keep knorm(max) top 4", "max", "reads no attention heads"),
    ("at vit.out keep knorm(no_rope) top 4", "knorm", "no rotary position embeddings"),
    ("at llm.layer2 keep knorm@llm.layer2 top 4", "knorm@", "do not exist yet"),
])
def test_knorm_misuse_is_located(src, at, words):
    d = first_error(src, SPEC)
    assert d.span.line == 1 and d.span.column >= src.index(at) + 1 and words in d.message
