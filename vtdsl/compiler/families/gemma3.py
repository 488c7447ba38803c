"""Gemma 3 (`Gemma3ForConditionalGeneration`): gemma-3-4b, tiny-gemma3.

The SigLIP tower encodes each 896-pixel view alone; the projector average-pools its patch
map (4x4 on gemma-3-4b) to 256 tokens in raster order, which the prompt holds between
`<start_of_image>` and `<end_of_image>`; pan-and-scan crops, when the processor makes
them, are more such views, each its own block between text. In the LLM an image block's
tokens attend to each other both ways (`token_type_ids`), the rest causally; layers are
sliding-window (a local rotary base) or global (their own base), each kind with its mask.

`vit.out` sits after the pool, at the projector's norm: a stage there chooses among a
view's 256 pooled tokens, ViT scores summed over each token's 4x4 patches; a stage inside
the tower keeps or drops whole 4x4 groups, whose patches go back to their raster rows
before the model's own pool (`vtdsl.compiler.vit_groups`).

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

from ..runtime import CompileError, Tokens
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

    def check(self, plan: Plan, features_vary: bool) -> None:
        # decode-time selection indexes every layer's cache by the prompt's rows; a
        # sliding-window layer's cache drops its oldest rows once the window is full
        if plan.decode:
            window = plan.spec.make_config().text_config.sliding_window if plan.spec.make_config else None
            raise CompileError(f"'during decode at llm.layer{plan.decode[0].layer}': {plan.spec.name}'s "
                               f"sliding-window layers keep only their last {window} cache rows, so the "
                               "selection's row indices would not line up with what they hold; vtdsl does not "
                               "run decode-time selection on Gemma 3 (prune at prefill instead)")

    def install(self, installer: Installer, plan: Plan) -> None:
        """While decoding past pruned LLM rows: full-length masks. When ViT stages change the
        placeholder count, the top-level rewrite shortens the prompt but not
        `token_type_ids` (generate even slices them from the end): they are remade from the
        prompt, 1 exactly at the image tokens, as the processor makes them."""
        decode = any(stage.site.tower == "llm" for stage in plan.stages)
        retype = plan.projector_tokens != plan.spec.projector_tokens
        if not (decode or retype):
            return
        model, image_token_id = installer.model, installer.model.config.image_token_id

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict):
            ids, am = kwargs.get("input_ids"), kwargs.get("attention_mask")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            out = dict(kwargs)
            if retype and ids is not None and kwargs.get("token_type_ids") is not None:
                out["token_type_ids"] = (ids == image_token_id).long()
            decoding = cache is not None and cache.get_seq_length() > 0
            if decode and decoding and isinstance(am, torch.Tensor) and am.dim() == 2:
                q = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
                if _pruned(cache, am.shape[1] - q):
                    out["attention_mask"] = full_length_masks(model, am, q)
            return args, out

        what = ("decode: full-length masks per layer kind (the LLM hooks gather their kept columns)" if decode
                else "") + ("; " if decode and retype else "") + (
                "token_type_ids remade from the shortened prompt" if retype else "")
        installer.hook(self.multimodal_path(plan.spec), "pre", pre_hook, what, with_kwargs=True)


FAMILY = Gemma3()
