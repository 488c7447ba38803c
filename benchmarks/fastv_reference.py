"""FastV the usual way, for comparison with the compiled policy (issue 8, item 3).

The usual FastV implementation (the paper's code, pkunlp-icler/FastV, and the
re-implementations modelled on it) patches the LLM's forward so that

1. the layer before the cut (K-1) runs **eager attention and returns its attention
   weights** (``output_attentions=True``; in transformers 5 sdpa returns no weights, so
   the model is loaded with ``attn_implementation="eager"``),
2. the image tokens are ranked by the attention the last prompt token pays them
   (``attn[0, :, -1, image].mean(heads)``) and the top R kept,
3. then either the sequence is cut (FastV "inplace": hidden states, RoPE cos/sin and
   the 4-D mask indexed to the kept positions, original positions kept), or the dropped
   tokens are only masked out of the attention of layers >= K (FastV's default
   attention-mask mode; the sequence keeps its length).

`CommonFastV` does exactly that with forward hooks on an unmodified HF model (batch 1,
like FastV). Modes:

- ``"drop"``: eager model, cut the sequence at K (FastV inplace).
- ``"mask"``: eager model, mask dropped tokens for layers >= K (FastV default).
- ``"hybrid"``: sdpa model whose layer K-1 alone is switched to eager to return its
  weights (what transformers 4's sdpa attention did when asked for
  ``output_attentions``), then cut: the most favourable version of the usual way.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor


class CommonFastV:
    def __init__(self, model, *, layer: int, keep: int, mode: str, image_token_id: int):
        if mode not in ("drop", "mask", "hybrid"):
            raise ValueError(mode)
        if layer < 1:
            raise ValueError("FastV needs a layer before the cut")
        self.model, self.layer, self.keep, self.mode = model, layer, keep, mode
        self.image_token_id = image_token_id
        lm = model.model.language_model
        self.handles = []
        self.kept: Tensor | None = None  # prompt positions of the kept image tokens
        self.scores: Tensor | None = None
        self._rows: Tensor | None = None  # kept prompt positions (text + image), ascending
        self._masked: Tensor | None = None
        self._cut: dict = {}
        self._attn_config = None
        impl = lm.config._attn_implementation
        if mode in ("drop", "mask") and impl != "eager":
            raise ValueError(f"mode {mode!r} is the eager-attention implementation (model has {impl})")
        attn = lm.layers[layer - 1].self_attn
        if mode == "hybrid":
            # only the scoring layer runs eager attention (and so returns weights)
            self._attn_config = attn.config
            eager = copy.copy(attn.config)
            eager._attn_implementation = "eager"
            attn.config = eager
            self.handles.append(
                lm.layers[layer - 1].register_forward_pre_hook(self._causal_mask_for_eager, with_kwargs=True)
            )
        self.handles.append(model.model.register_forward_pre_hook(self._record_prompt, with_kwargs=True))
        self.handles.append(attn.register_forward_hook(self._score))
        for j in range(layer, len(lm.layers)):
            self.handles.append(lm.layers[j].register_forward_pre_hook(self._prune(j), with_kwargs=True))

    # ----------------------------------------------------------------- hooks
    def _record_prompt(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids.shape[0] != 1:
            raise ValueError("FastV (like its reference code) handles batch 1")
        self.image_pos = (input_ids[0] == self.image_token_id).nonzero().flatten()
        self.n = input_ids.shape[1]
        self._rows = self._masked = None
        self._cut = {}

    @staticmethod
    def _causal_mask_for_eager(module, args, kwargs):
        if kwargs.get("attention_mask") is not None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        n = h.shape[1]
        mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu_(1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask[None, None]
        return args, kwargs

    def _score(self, module, args, output):
        weights = output[1]  # [1, H, N, N]: what output_attentions=True returns
        if weights is None:
            raise RuntimeError("the scoring layer returned no attention weights (not eager)")
        last = weights[0, :, -1, :].mean(0)  # last prompt token, mean over heads
        self.scores = last[self.image_pos]
        top = self.scores.topk(self.keep).indices
        self.kept = self.image_pos[top].sort().values
        keep = torch.ones(self.n, dtype=torch.bool, device=last.device)
        keep[self.image_pos] = False
        keep[self.kept] = True
        self._rows = keep.nonzero().flatten()

    def _prune(self, j: int):
        def hook(module, args, kwargs):
            rows = self._rows
            if rows is None:
                return None
            kwargs = dict(kwargs)
            mask = kwargs.get("attention_mask")
            if self.mode == "mask":
                if self._masked is None:
                    dropped = torch.ones(self.n, dtype=torch.bool, device=rows.device)
                    dropped[rows] = False
                    self._masked = mask.masked_fill(dropped[None, None, None, :], torch.finfo(mask.dtype).min)
                kwargs["attention_mask"] = self._masked
                return args, kwargs
            # drop (FastV inplace): index everything by the kept positions, once
            if j == self.layer:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                hidden = hidden[:, rows]
                args = (hidden, *args[1:]) if args else ()
                if not args:
                    kwargs["hidden_states"] = hidden
                cos, sin = kwargs["position_embeddings"]
                self._cut = {"position_embeddings": (cos[:, rows], sin[:, rows])}
                if kwargs.get("position_ids") is not None:
                    self._cut["position_ids"] = kwargs["position_ids"][:, rows]
                if mask is not None:
                    self._cut["attention_mask"] = mask[:, :, rows][:, :, :, rows]
            kwargs.update(self._cut)
            return args, kwargs

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self._attn_config is not None:
            self.model.model.language_model.layers[self.layer - 1].self_attn.config = self._attn_config
            self._attn_config = None
