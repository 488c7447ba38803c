"""The compiler: install a checked `Plan` on a transformers vision-language model.

    import vtdsl.compiler as vc
    model = vc.compile("at llm.layer2 keep text top 50%", model)   # in place
    with vc.apply(policy, model): ...                              # undone on exit
    vc.compiled(model).listing.text()                              # what changed where
    vc.compile_regions(model)                                      # torch.compile of its layers

The IR does not know how a stage is installed; each tower uses the mechanism that holds.

Decision record (measured with torch 2.13 / transformers 5.24, tiny-llava and meta
llava-1.5-7b):

- ViT: **torch.fx**. `CLIPEncoder.forward` is a plain loop; tracing it one level up
  (a root calling ``encoder(inputs_embeds=x)``, layers as leaf modules) gives a chain of
  ``layers.i`` calls in ~1.5 ms (tiny) / ~4 ms (7b, meta; a whole compile + undo of a
  three-stage policy takes ~9 ms). Prune nodes are inserted
  between ``layers.N-1`` and ``layers.N`` and the encoder module is swapped for the
  `GraphModule` (same state-dict keys; swapped back on undo). Tracing the encoder
  directly fails (``**kwargs`` splatted into each layer), so does tracing the whole HF
  model (decorators, masking utilities).
- LLM: **forward hooks** on the decoder layers. Tracing `LlamaModel` with layers (and
  rotary embedding) as leaves fails, with or without a mask, in `create_causal_mask`
  (``attention_mask.ndim`` / packed-sequence checks on Proxies: data-dependent control
  flow), and a traced loop would bake in ``use_cache=False`` anyway (DynamicCache is not
  traceable), so it could never serve `generate()`'s decode steps. Pre-hooks with
  kwargs on each layer gather the hidden states at a stage and the position embeddings,
  position ids and 4-D mask for every later layer; decode steps find their prompt's state
  through the cache object. `llm.layer0` stages run in a pre-hook on the language model
  itself (its input embeddings, 2-D mask and position ids), because the mask transformers
  builds is sized by layer 0's cache.
- Prompt: a pre-hook on the top-level forward and an instance-level `generate` wrapper
  (`generation.PromptGenerate`, which still returns the caller's ids, then the new tokens)
  shorten the image placeholder runs when the policy changes the visual-token count;
  `patch_processor` / `processor_for` adjust a `LlavaProcessor` instead
  (`num_additional_image_tokens`); `rewrite_inputs` is the pure function behind both.

Everything is a hook handle, a module swap or an instance attribute recorded with its
undo, so `apply` restores the original module tree exactly: `installer.Installer` makes
every rewrite (listed, undo recorded) in named steps, and `handle.Compiled` undoes them.
What depends on the model family (module paths, the LLM's token layout, the argument
carrying each image's size, LLaVA-NeXT's crop packing) is asked of the family object,
`families.family_of(spec)`, one module per family under `families/`.
"""

from .api import (
    Compiled,
    apply,
    compile,
    compiled,
    image_token_count,
    kept_counts,
    kept_tokens,
    original_image_token_count,
    resolve_plan,
    uncompile,
)
from .inputs import patch_processor, processor_for, rewrite_inputs
from .listing import Listing, Rewrite, stage_module_path, stage_text
from .regions import compile_regions, uncompile_regions
from .runtime import CompileError

__all__ = [
    "CompileError",
    "Compiled",
    "Listing",
    "Rewrite",
    "apply",
    "compile",
    "compile_regions",
    "compiled",
    "image_token_count",
    "kept_counts",
    "kept_tokens",
    "original_image_token_count",
    "patch_processor",
    "processor_for",
    "resolve_plan",
    "rewrite_inputs",
    "stage_module_path",
    "stage_text",
    "uncompile",
    "uncompile_regions",
]
