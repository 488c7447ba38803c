"""Decode-time KV selection (`during decode at llm.layerN attend top K`, DyCoke's dynamic
pruning): at every generated token, the new query's attention at LLM layer N-1 (softmax
over the whole cache, mean over heads) picks the top K visual entries, and layers N and
after attend to those and to every text entry only. The cache is never touched and the
prefill is unchanged: the selection is an addition to each later layer's attention mask
(a float mask for eager attention, a boolean one when sdpa was handed booleans), so
eager and sdpa agree, and it is made afresh from the full cache at every step.

Hooks: the multimodal model (which prompt rows are image tokens, read at prefill),
layer N-1's `q_proj` (the new query) and `self_attn` (after it appended its key: score
and select), and a pre-hook on the `self_attn` of every later layer (restrict the mask).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ir.plan import DecodeSelection
from ..ops.attention import repeat_kv
from ..ops.scorers.attention import apply_rope


def _cache_of(kwargs: dict):
    return kwargs.get("cache", kwargs.get("past_key_values"))


class DecodeRuntime:
    def __init__(self, sel: DecodeSelection, image_token_id: int | tuple[int, ...], num_heads: int,
                 num_kv_heads: int, scaling: float, llm_rt=None):
        self.sel = sel
        self.llm_rt = llm_rt  # prefill LLM stages (all before layer N): which cache rows are images
        # the visual placeholders: the image's, and a video's on families that take video
        self.token_ids = (image_token_id,) if isinstance(image_token_id, int) else tuple(image_token_id)
        self.num_heads, self.num_kv_heads, self.scaling = num_heads, num_kv_heads, scaling
        self.image_rows: Tensor | None = None  # [B, prompt length]: image rows of the prompt
        self.q: Tensor | None = None
        self.allowed: Tensor | None = None  # [B, n]: the keys layers N.. may attend to at this step

    def multimodal_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = _cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # a decode step: the prompt's image rows were read at prefill
        self.allowed = None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            self.image_rows = torch.isin(input_ids, torch.tensor(self.token_ids, device=input_ids.device))
            return None
        embeds = kwargs.get("inputs_embeds")
        tokens = torch.tensor(self.token_ids, dtype=torch.long, device=embeds.device)
        table = module.get_input_embeddings()(tokens)  # [ids, d]
        self.image_rows = (embeds[:, :, None] == table).all(-1).any(-1)
        return None

    def q_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.q = output
        return None

    def score_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Layer N-1's attention, after its key joined the cache: pick the entries."""
        q, self.q = self.q, None
        cache = _cache_of(kwargs)
        self.allowed = None
        n = cache.get_seq_length(self.sel.layer - 1) if cache is not None else 0
        if q is None or n <= q.shape[1] or self.image_rows is None:
            return None  # prefill (the cache holds only the rows it just wrote) or no image
        self.allowed = self._select(module, q, cache, n, kwargs)
        return None

    def _image_rows(self, cache) -> Tensor:
        """[B, rows] image flags of the cache's prompt rows at layer N-1: the prompt's, or
        what the LLM prefill stages (all before layer N) left."""
        st = self.llm_rt.by_cache.get(cache) if self.llm_rt is not None else None
        return self.image_rows if st is None else st.is_img

    def _select(self, module: nn.Module, q: Tensor, cache, n: int, kwargs: dict) -> Tensor:
        b, h = q.shape[0], self.num_heads
        q = q.view(b, 1, h, -1).transpose(1, 2)
        if hasattr(module, "q_norm"):  # Qwen3-style per-head norm before RoPE
            q = module.q_norm(q)
        cos, sin = kwargs["position_embeddings"]
        q = apply_rope(q.float(), cos.expand(b, -1, -1).float(), sin.expand(b, -1, -1).float())
        keys = repeat_kv(cache.layers[self.sel.layer - 1].keys.float(), h // self.num_kv_heads)
        logits = (q @ keys.transpose(-1, -2)) * self.scaling  # [B, H, 1, n]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = mask[..., -1:, :n]
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
        att = logits.softmax(-1).mean(1)[:, 0]  # [B, n]
        image = torch.zeros(b, n, dtype=torch.bool, device=att.device)
        rows = self._image_rows(cache).to(att.device)
        image[:, : rows.shape[1]] = rows[:, :n]
        allowed = ~image  # text entries always
        if self.sel.mass is not None:
            return allowed | self._top_p(att, image)
        k = min(self.sel.k, n)
        top = att.masked_fill(~image, float("-inf")).topk(k, dim=-1).indices
        return allowed.scatter_(1, top, True)  # a row with fewer than k images picks some text again

    def _top_p(self, att: Tensor, image: Tensor) -> Tensor:
        """Per row, the fewest visual entries (highest first) whose attention reaches the
        share `mass` of all visual entries' attention: each entry whose predecessors'
        share is still below it."""
        vis = att.masked_fill(~image, 0.0)
        order = vis.argsort(dim=-1, descending=True)
        ranked = vis.gather(1, order)
        before = (ranked.cumsum(-1) - ranked) / ranked.sum(-1, keepdim=True).clamp_min(1e-30)
        take = (before < self.sel.mass) & image.gather(1, order)
        return torch.zeros_like(image).scatter_(1, order, take)

    def restrict_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Layers N..: the step's mask with the unselected visual entries blocked."""
        allowed = self.allowed
        if allowed is None:
            return None
        mask = kwargs.get("attention_mask")
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        n = allowed.shape[1]
        width = n if mask is None else mask.shape[-1]
        keep = torch.ones(allowed.shape[0], width, dtype=torch.bool, device=allowed.device)
        keep[:, :n] = allowed
        keep = keep[:, None, None, :]
        if mask is None:
            mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=keep.device)
            mask = mask.masked_fill(~keep, torch.finfo(hidden.dtype).min)
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs


def install_decode(inst, image_token_id: int | tuple[int, ...], llm_rt=None) -> None:
    """Install the plan's decode selection (at most one) with `inst`'s undoable hooks."""
    if not inst.plan.decode:
        return
    sel = inst.plan.decode[0]
    spec, model = inst.spec, inst.model
    attn_path = spec.llm_layer_path.format(i=sel.layer - 1) + ".self_attn"
    attn = model.get_submodule(attn_path)
    rt = DecodeRuntime(sel, image_token_id, spec.llm.heads, spec.llm.kv_heads,
                       getattr(attn, "scaling", spec.llm.head_dim**-0.5), llm_rt)
    inst.listing.mechanism["decode"] = "hooks"
    inst.hook(inst.family.multimodal_path(spec), "pre", rt.multimodal_pre_hook,
              "decode selection: record which prompt rows are image tokens (prefill)", with_kwargs=True)
    inst.hook(attn_path + ".q_proj", "post", rt.q_hook, "decode selection: capture the new token's query")
    inst.hook(attn_path, "post", rt.score_hook,
              f"{sel.text}: the new token's head-mean attention over the cache picks "
              f"{'the top-p' if sel.mass is not None else sel.k} of {sel.visual} visual entries (decode steps only)",
              with_kwargs=True)
    for j in range(sel.layer, spec.llm.layers):
        inst.hook(spec.llm_layer_path.format(i=j) + ".self_attn", "pre", rt.restrict_pre_hook,
                  "decode selection: block the unselected visual entries in the attention mask", with_kwargs=True)
