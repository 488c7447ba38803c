"""Plain references shared by the model-family tests: the uncompiled transformers model
with pruned positions masked out, eager attention rows, and hand-computed CLS attention.
Nothing here imports vtdsl's ops or compiler."""

from __future__ import annotations

import math

import torch


def sharpen_llm(model: torch.nn.Module, factor: float = 8.0) -> torch.nn.Module:
    """Scale the LLM's q/k projections: random init gives near-uniform attention, hence
    near-tied scores; sharper attention makes the reference rankings unambiguous."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.startswith("model.language_model") and name.endswith(("q_proj", "k_proj")):
                mod.weight.mul_(factor)
    return model


def peaked(spec, factor: float = 8.0) -> torch.nn.Module:
    """The spec's random model (seed 0, eager) with every ViT and LLM query projection
    scaled: attention sharp enough for unambiguous reference rankings."""
    model = spec.build(device="cpu", attn_implementation="eager", seed=0).eval()
    with torch.no_grad():
        for layer in [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]:
            layer.self_attn.q_proj.weight.mul_(factor)
    return model


def feature_layer(model, px: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain vision tower's feature layer: its CLS attention over the patches (head
    mean) ``[B, P]`` and its patch outputs ``[B, P, d]``."""
    with torch.no_grad():
        out = model.model.vision_tower(px, output_attentions=True, output_hidden_states=True)
    cls = out.attentions[spec.feature_layer_index][:, :, 0, 1:].mean(1)
    return cls, out.hidden_states[spec.feature_layer_index + 1][:, 1:]


def generate_on_features(model, input_ids, attention_mask, image_token_id: int, features, new_tokens: int):
    """Greedy `generate` of the plain model from its input embeddings, with the image
    placeholders' rows replaced by `features[b]` (``[rows, d]`` per sample): what a model
    fed exactly those visual tokens produces. Returns the new tokens only."""
    embeds = model.get_input_embeddings()(input_ids).clone()
    for b in range(input_ids.shape[0]):
        embeds[b, input_ids[b] == image_token_id] = features[b]
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             do_sample=False)
    return out[:, -new_tokens:]


def masked_generate(ref, batch_inputs: dict, pruned: list[torch.Tensor], from_layer: int, new_tokens: int):
    """Greedy `generate` of `ref` with the positions `pruned[b]` of sample b masked out of
    every attention from LLM layer `from_layer` on, positions unchanged: what a prune at
    that layer means."""
    def hook(module, args, kwargs):
        m = kwargs["attention_mask"]
        m = m.expand(len(pruned), *m.shape[1:]).clone()
        blocked = False if m.dtype == torch.bool else torch.finfo(m.dtype).min  # bool masks: True = attend
        for b, cols in enumerate(pruned):
            m[b, :, :, cols] = blocked
        kwargs["attention_mask"] = m
        return args, kwargs

    layers = ref.model.language_model.layers
    hooks = [layers[j].register_forward_pre_hook(hook, with_kwargs=True) for j in range(from_layer, len(layers))]
    try:
        with torch.no_grad():
            return ref.generate(**batch_inputs, max_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in hooks:
            h.remove()


def last_query_attention(ref, batch_inputs: dict, layer: int) -> torch.Tensor:
    """Eager attention of the last prompt row at LLM `layer`, head mean ``[B, N]``."""
    with torch.no_grad():
        out = ref(**batch_inputs, output_attentions=True)
    return out.attentions[layer][:, :, -1, :].mean(1)


def top_rows(scores: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The k rows of `rows` with the highest `scores`, ascending; refuses near ties."""
    s = scores[rows]
    order = torch.argsort(s, descending=True)
    assert (s[order[k - 1]] - s[order[k]]).item() > 1e-6, "near-tied scores: the reference would be ambiguous"
    return rows[order[:k]].sort().values


def prune_to_top(scores: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, k: int):
    """Per sample: the k image positions with the highest scores, and the other ones."""
    kept, pruned = [], []
    for b in range(input_ids.shape[0]):
        rows = (input_ids[b] == image_token_id).nonzero().flatten()
        chosen = top_rows(scores[b], rows, k)
        kept.append(chosen)
        pruned.append(rows[~torch.isin(rows, chosen)])
    return torch.stack(kept), pruned


def clip_cls_scores(layer_mod, h: torch.Tensor) -> torch.Tensor:
    """CLS-row softmax attention of a CLIP layer on its input h, head mean, patch columns."""
    x = layer_mod.layer_norm1(h)
    attn = layer_mod.self_attn
    heads, dh = attn.num_heads, attn.head_dim
    q = attn.q_proj(x)[:, :1].view(h.shape[0], 1, heads, dh).transpose(1, 2)
    k = attn.k_proj(x).view(h.shape[0], -1, heads, dh).transpose(1, 2)
    probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(dh), dim=-1)  # [B, H, 1, n]
    return probs.mean(1)[:, 0, 1:]


def first_error(src: str, spec):
    """The first diagnostic `vtdsl.ir.check` raises for `src` on `spec` (fails if none)."""
    import pytest

    from vtdsl.ir import check
    from vtdsl.lang.errors import PolicyError

    with pytest.raises(PolicyError) as err:
        check(src, spec)
    return err.value.diagnostics[0]


def sharpened_pair(spec) -> dict:
    """The spec's random model (seed 0) with sharpened LLM attention, eager and sdpa."""
    return {attn: sharpen_llm(spec.build(device="cpu", attn_implementation=attn, seed=0).eval())
            for attn in ("eager", "sdpa")}
