"""Gemma 3 (`Gemma3ForConditionalGeneration`): gemma-3-4b, tiny-gemma3.

The SigLIP tower encodes each 896-pixel view alone; the projector average-pools its patch
map (4x4 on gemma-3-4b) to 256 tokens in raster order, which the prompt holds between
`<start_of_image>` and `<end_of_image>`; pan-and-scan crops, when the processor makes
them, are more such views, each its own block between text. In the LLM an image block's
tokens attend to each other both ways (`token_type_ids`), the rest causally; layers are
sliding-window (a local rotary base) or global (their own base), each kind with its mask.

`Gemma3Model` builds those masks before its LLM, from the prompt's full length. At
prefill that is what the LLM hooks gather (each layer its own kind's mask, rows and
columns to the kept positions, so kept image tokens still attend both ways). While
decoding it would size them by the pruned caches; the rewrite here hands the LLM
full-length masks instead, which the hooks gather per layer like the prefill's, cut to
what a sliding-window layer's cache still holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..runtime import Tokens
from .base import Family
from .llava_next import anyres_tokens

if TYPE_CHECKING:  # pragma: no cover
    from ...ir.plan import Plan
    from ...models.spec import ModelSpec
    from ..installer import Installer


def full_length_masks(model: nn.Module, attention_mask: torch.Tensor, q: int) -> dict[str, torch.Tensor]:
    """The 4-D masks of the `q` newest rows over the whole sequence `attention_mask`
    ``[B, n]`` covers, for each layer kind, made by transformers' own mask functions
    without a cache (so sized by the sequence, not by what any layer's cache holds)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = model.config.get_text_config()
    b, n = attention_mask.shape
    like = torch.empty(b, n, 0, dtype=model.dtype, device=attention_mask.device)
    kw = dict(config=config, inputs_embeds=like, attention_mask=attention_mask, cache=None, allow_is_causal_skip=False)
    masks = {"full_attention": create_causal_mask(**kw), "sliding_attention": create_sliding_window_causal_mask(**kw)}
    return {kind: mask[..., -q:, :] for kind, mask in masks.items()}


def _pruned(cache, prompt_and_past: int) -> bool:
    """Whether LLM stages left some layer's cache shorter than the sequence."""
    return any(cache.get_seq_length(j) != prompt_and_past for j in range(len(cache.layers)))


class Gemma3(Family):
    """Pooled views (plus pan-and-scan crops), bidirectional image blocks, two layer kinds
    (`renumber` inside the LLM asks the rotary embedding for the layer's kind)."""

    name = "gemma3"
    layout_fields = ("spatial_merge", "pan_and_scan")
    norms_heads_first = True  # Gemma3Attention norms q and k once their heads lead

    def llm_tokens(self, spec: ModelSpec, images: int, per_image: int, device, vit_tokens: Tokens | None, *,
                   intact: bool) -> Tokens:
        if spec.vit_crops == 1:
            return super().llm_tokens(spec, images, per_image, device, vit_tokens, intact=intact)
        # the original view's block, then each crop's: no shared grid
        return anyres_tokens(images, per_image, spec, device, intact=False)

    def install(self, installer: Installer, plan: Plan) -> None:
        if not any(stage.site.tower == "llm" for stage in plan.stages):
            return
        model = installer.model

        def decode_masks(module: nn.Module, args: tuple, kwargs: dict):
            cache, am = kwargs.get("cache", kwargs.get("past_key_values")), kwargs.get("attention_mask")
            if cache is None or not isinstance(am, torch.Tensor) or am.dim() != 2 or cache.get_seq_length() == 0:
                return None
            rows = kwargs.get("input_ids")
            q = (rows if rows is not None else kwargs["inputs_embeds"]).shape[1]
            if not _pruned(cache, am.shape[1] - q):
                return None
            return args, {**kwargs, "attention_mask": full_length_masks(model, am, q)}

        installer.hook(self.multimodal_path(plan.spec), "pre", decode_masks,
                       "decode: full-length masks per layer kind (the LLM hooks gather their kept columns)",
                       with_kwargs=True)


FAMILY = Gemma3()
