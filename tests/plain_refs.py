"""Plain references shared by the model-family tests: the uncompiled transformers model
with pruned positions masked out, eager attention rows, and hand-computed CLS attention.
Nothing here imports vtdsl's ops or compiler."""

from __future__ import annotations

import math

import torch


def image_zoo() -> list:
    """The zoo files of image methods, written for llava-1.5-7b (policies/*.vt); video
    methods (evs.vt) name frames and run on video in their own tests."""
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "policies").glob("*.vt"))
    return [p for p in paths if '\nmodel "llava-1.5-7b"' in p.read_text(encoding="utf-8")]


def llm_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers: `model.language_model` (LLaVA, Qwen) or `model.text_model`
    (SmolVLM / Idefics3)."""
    inner = model.model
    return (inner.language_model if hasattr(inner, "language_model") else inner.text_model).layers


def sharpen_llm(model: torch.nn.Module, factor: float = 8.0) -> torch.nn.Module:
    """Scale the LLM's q/k projections: random init gives near-uniform attention, hence
    near-tied scores; sharper attention makes the reference rankings unambiguous."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.startswith(("model.language_model", "model.text_model")) and name.endswith(("q_proj", "k_proj")):
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
    layers = llm_layers(ref)
    hook = _blocking(pruned)
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


def plain_copy(spec, model, attn: str = "eager"):
    """A fresh uncompiled model of `spec` with `model`'s weights: the reference side of a
    compiled-vs-plain comparison (the compiled model's hooks never touch it)."""
    ref = spec.build(device="cpu", attn_implementation=attn, seed=0).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def mrope_inputs(batch: int, side: int = 16, seed: int = 5, img: int = 250, start: int = 251, end: int = 252,
                 patch: int = 14):
    """Qwen-VL inputs: one side x side-patch image per prompt (side / 2 squared merged
    placeholders, wrapped in vision start/end), batch 2 left-padded with id 2; random
    patch pixels (temporal patch 2 x patch x patch x 3; Qwen3-VL's patch is 16)."""
    ids, mask = qwen_prompts(batch, [img] * ((side // 2) ** 2), start, end)
    px = torch.randn(len(ids) * side * side, 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=px,
                image_grid_thw=torch.tensor([[1, side, side]] * len(ids)), mm_token_type_ids=(ids == img).int())


def qwen_prompts(batch: int, visual: list[int], start: int = 251, end: int = 252) -> tuple[torch.Tensor, torch.Tensor]:
    """The Qwen-VL test prompts: the `visual` placeholder ids between vision start/end and
    a few text ids; batch 2 adds a longer prompt and left-pads the first with id 2.
    Returns (input_ids, attention_mask)."""
    rows = [[5, 6, 7, start] + visual + [end, 8, 9, 10]]
    if batch == 2:
        rows.append([11, 12, 13, 14, 15, start] + visual + [end, 18, 19])
    return left_padded(rows, pad=2)


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch, left-padded with `pad`: (input_ids,
    attention_mask)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    return ids, mask


def clip_crop_features(model, px: torch.Tensor, prune_at: int, keep: int) -> torch.Tensor:
    """Each anyres crop through a LLaVA-NeXT model's CLIP layers by hand, pruned before layer
    `prune_at` to the `keep` patches the CLS row of layer prune_at-1 attends to most; the
    feature layer's (-2) patches through the projector; crops concatenated in order (base
    view first)."""
    vt = model.model.vision_tower
    layers = vt.encoder.layers
    with torch.no_grad():
        h = vt.pre_layrnorm(vt.embeddings(px.reshape(-1, *px.shape[2:])))
        prev = feats = None
        for i, layer in enumerate(layers):
            if i == prune_at:
                idx = torch.topk(clip_cls_scores(layers[i - 1], prev), keep, dim=1).indices.sort(1).values
                h = torch.cat([h[:, :1], torch.stack([h[c, 1 + idx[c]] for c in range(h.shape[0])])], 1)
            prev = h
            h = layer(h, None)
            if i == len(layers) - 2:  # vision_feature_layer -2
                feats = h[:, 1:]
        out = model.model.multi_modal_projector(feats)
    return out.reshape(px.shape[0], -1, out.shape[-1])


def top_k_reference(ref, batch_inputs: dict, image_token_id: int, k: int, layer: int, new_tokens: int):
    """`keep text top k` at LLM `layer` by hand: the last prompt row's head-mean attention
    at `layer - 1`, its top k image positions kept, the rest masked from `layer` on.
    Returns (kept positions [B, k], greedy tokens)."""
    att = last_query_attention(ref, batch_inputs, layer - 1)
    kept, pruned = prune_to_top(att, batch_inputs["input_ids"], image_token_id, k)
    return kept, masked_generate(ref, batch_inputs, pruned, from_layer=layer, new_tokens=new_tokens)


def qwen_meta_prefill_flops(model, side: int, image_token_id: int = 151655, start: int = 151652,
                            end: int = 151653) -> tuple[int, int]:
    """FlopCounterMode of a Qwen-VL prefill on the meta device: the vision tower called
    directly (its rotary ids precomputed: meta tensors cannot be read), the features
    scattered by hand, then the LLM with the model's own M-RoPE ids, last logits only.
    Returns (FLOPs, text tokens); the image is side x side patches."""
    import transformers.vision_utils as vu
    from torch.utils.flop_counter import FlopCounterMode

    n_img = (side // 2) ** 2
    grid = torch.tensor([[1, side, side]])
    ids = torch.tensor([[9] * 20 + [start] + [image_token_id] * n_img + [end] + [9] * 42])
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_token_id).int(), image_grid_thw=grid)
    pixels = torch.empty(side * side, 1176, dtype=model.dtype, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vision = model.model.visual(pixels, grid_thw=grid, position_ids=vu.get_vision_position_ids(grid, 2).to("meta"))
        embeds = model.get_input_embeddings()(ids.to("meta"))
        embeds = embeds.masked_scatter((ids == image_token_id)[..., None].to("meta"), vision.pooler_output)
        model(inputs_embeds=embeds, position_ids=pos.to("meta"), use_cache=False, logits_to_keep=1)
    return counter.get_total_flops(), ids.shape[1] - n_img


def qwen_7b_merger_llm_flops(text: int, n_img: int = 576) -> int:
    """FLOPs by hand of what Qwen2-VL-7B and Qwen2.5-VL-7B share after the vision tower:
    the merger (5120 -> 5120 -> 3584 per merged token), 28 Qwen2-7B layers (hidden 3584,
    4 KV heads of 128, SwiGLU 18944) over every token, the last row's logits (152064)."""
    merger = 2 * n_img * (5120 * 5120 + 5120 * 3584)
    n, h, kv = n_img + text, 3584, 512
    llm = 28 * (2 * n * (2 * h * h + 2 * h * kv + 3 * h * 18944) + 4 * n * n * h)
    return merger + llm + 2 * h * 152064


def flops_per_part(model, counter) -> dict[str, int]:
    """What FlopCounterMode (`counter`, after a forward of `model`) counted in each part of a
    model laid out as `model.vision_tower`, `model.multi_modal_projector`,
    `model.language_model` and `lm_head`."""
    root = type(model).__name__
    per_module = counter.get_flop_counts()
    modules = {"vit": "model.vision_tower", "projector": "model.multi_modal_projector",
               "llm": "model.language_model", "lm_head": "lm_head"}
    return {part: sum(per_module.get(f"{root}.{name}", {}).values()) for part, name in modules.items()}


def _blocking(pruned: list[torch.Tensor]):
    """A decoder-layer pre-hook blocking the key columns `pruned[b]` of sample b."""
    def hook(module, args, kwargs):
        m = kwargs["attention_mask"]
        m = m.expand(len(pruned), *m.shape[1:]).clone()
        blocked = False if m.dtype == torch.bool else torch.finfo(m.dtype).min  # bool masks: True = attend
        for b, cols in enumerate(pruned):
            m[b, :, :, cols] = blocked
        kwargs["attention_mask"] = m
        return args, kwargs
    return hook


def decode_reference(ref, batch_inputs: dict, vid: int, layer: int, k: int, steps: int):
    """DyCoke's decode rule by hand on the plain eager model's own generate: at each new
    token (a one-row query), the head-mean attention row of layer-1 over the cache (its
    eager weights) picks the top k of the video's rows, and layers from `layer` on have the
    others blocked for that step. Returns generate's output (sequences and scores)."""
    visual = batch_inputs["input_ids"] == vid
    layers = ref.model.language_model.layers
    pruned: list[torch.Tensor] = []

    def pick(module, args, output):
        weights = output[1]
        pruned.clear()
        if weights is None or weights.shape[2] != 1:
            return None  # prefill: nothing is selected
        row = weights[:, :, -1, :].float().mean(1)
        for b in range(row.shape[0]):
            rows = visual[b].nonzero().flatten()
            order = torch.argsort(row[b, rows], descending=True)
            assert row[b, rows[order[k - 1]]] - row[b, rows[order[k]]] > 1e-7, "near tie"
            pruned.append(rows[order[k:]])
        return None

    def block(module, args, kwargs):
        return _blocking(pruned)(module, args, kwargs) if pruned else None

    hooks = [layers[layer - 1].self_attn.register_forward_hook(pick)]
    hooks += [layers[j].register_forward_pre_hook(block, with_kwargs=True) for j in range(layer, len(layers))]
    try:
        with torch.no_grad():
            return ref.generate(**batch_inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
    finally:
        for h in hooks:
            h.remove()
