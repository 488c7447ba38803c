"""`generate()` of a compiled model whose prompt is shortened, with Hugging Face's contract.

A policy that prunes in the ViT or at `vit.out` sends fewer visual tokens to the LLM, so
each image's placeholder run must shrink to match (`inputs.rewrite_inputs`). Inside
`generate()` that shortening cannot happen at the forward alone: generate's own
bookkeeping (the cache length, position ids and the attention mask it grows each step)
follows the ids it was handed, so it must be handed the short prompt. What the caller
gets back must not show it, though: every Hugging Face idiom
(``out[:, inputs["input_ids"].shape[1]:]``, ``pipeline("image-text-to-text")``,
lmms-eval's ``llava_hf``) slices the new tokens off at the caller's prompt length.

`PromptGenerate` is the instance-level `generate` the installer puts on such a model. It
shortens the prompt, runs transformers' `generate` on it, and hands back the caller's own
``input_ids`` followed by the new tokens, so the new tokens are exactly what the plain
generate of the short prompt produced:

- ``sequences`` (a tensor, or the field of a ``return_dict_in_generate=True`` output) is
  ``[caller's input_ids | new tokens]``, rows repeated as transformers repeats them
  (``num_return_sequences``, beams); ``scores`` / ``logits`` hold one entry per new token
  either way, so they stay consistent with it. Per-step ``attentions`` / ``hidden_states``
  and the returned cache are the model's own, over the short prompt;
- a ``streamer`` is handed the caller's ids where transformers hands it the prompt, then
  the new tokens (``skip_prompt=True`` streamers see only the new tokens);
- ``max_length`` / ``min_length`` passed to `generate` count the caller's prompt, as they
  do in transformers (they are lowered by the placeholders removed);
- a prompt that already has the compiled count (a patched processor), or a call without
  ``input_ids``, passes through unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["PromptGenerate"]

_LENGTH_LIMITS = ("max_length", "min_length")  # counted with the prompt in transformers


class PromptGenerate:
    """The `generate` of a compiled model: shortened prompt in, caller's prompt out.

    Parameters
    ----------
    model : nn.Module
        The compiled model (its class's `generate` runs the generation).
    rewrite : callable
        ``kwargs -> kwargs``: shortens the placeholder runs of a call's prompt (returns
        the same ``input_ids`` object when there is nothing to shorten).
    previous : callable, optional
        An instance-level `generate` that was on the model before (called instead of the
        class's).
    """

    def __init__(self, model, rewrite: Callable[[dict], dict], previous: Callable | None = None):
        self.model = model
        self.rewrite = rewrite
        self.previous = previous
        self.params = _positional_params(type(model).generate)
        self.__doc__ = type(model).generate.__doc__  # help(model.generate) stays transformers' own

    def __call__(self, *args, **kwargs):
        kwargs = self._as_keywords(args, kwargs)
        caller = kwargs.get("input_ids")
        short = self.rewrite(kwargs)
        if not isinstance(caller, Tensor) or short.get("input_ids") is caller:
            return self._generate(short)
        removed = caller.shape[-1] - short["input_ids"].shape[-1]
        short = _lower_length_limits(short, removed)
        if short.get("streamer") is not None:
            short["streamer"] = _CallerPromptStreamer(short["streamer"], caller)
        out = self._generate(short)
        return _with_caller_prompt(out, caller, short["input_ids"].shape[-1])

    def _as_keywords(self, args: tuple, kwargs: dict) -> dict:
        """Positional arguments by their names in transformers' `generate`; the prompt as
        ``input_ids`` (transformers takes it as ``inputs`` too)."""
        if len(args) > len(self.params):
            raise TypeError(f"generate() takes at most {len(self.params)} positional arguments ({len(args)} given)")
        kwargs = {**dict(zip(self.params, args)), **kwargs}
        inputs = kwargs.pop("inputs", None)
        if inputs is not None:
            if kwargs.get("input_ids") is not None:
                raise TypeError("generate() got the prompt twice (inputs and input_ids)")
            kwargs["input_ids"] = inputs
        return kwargs

    def _generate(self, kwargs: dict):
        if self.previous is not None:
            return self.previous(**kwargs)
        return type(self.model).generate(self.model, **kwargs)


def _positional_params(fn: Callable) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())[1:]  # after self
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _lower_length_limits(kwargs: dict, removed: int) -> dict:
    for key in _LENGTH_LIMITS:
        if kwargs.get(key) is not None:
            kwargs[key] = max(int(kwargs[key]) - removed, 0)
    return kwargs


def _with_caller_prompt(out: Any, caller: Tensor, short_len: int):
    """`out` (ids, or an output with ``sequences``) with the short prompt replaced by the
    caller's ``input_ids``."""
    sequences = out if isinstance(out, Tensor) else getattr(out, "sequences", None)
    if not isinstance(sequences, Tensor):
        return out
    prompt = caller.to(sequences.device)
    if sequences.shape[0] != prompt.shape[0]:
        # transformers repeats each prompt row for num_return_sequences / beams
        prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
    restored = torch.cat([prompt.to(sequences.dtype), sequences[:, short_len:]], dim=-1)
    if isinstance(out, Tensor):
        return restored
    out.sequences = restored
    return out


class _CallerPromptStreamer:
    """Hands the caller's prompt to a streamer where transformers hands it the short one.
    (transformers only calls `put` / `end`; not a `BaseStreamer` subclass, so importing
    the compiler does not import transformers.)"""

    def __init__(self, inner, caller: Tensor):
        self.inner = inner
        self.caller = caller

    def put(self, value):
        if self.caller is not None:  # the first put is the prompt
            value, self.caller = self.caller.cpu(), None
        self.inner.put(value)

    def end(self):
        self.inner.end()

    def __getattr__(self, name):
        return getattr(self.inner, name)
