"""Keeping the prompt's image placeholders in step with the compiled model.

LLaVA merges image features into the prompt by `masked_scatter` over the positions where
`input_ids == image_token_id`, so the number of placeholder tokens per image must equal
the number of visual tokens the (compiled) projector emits. A policy that prunes in the
ViT or at `vit.out` changes that number; three ways keep prompts consistent:

1. `rewrite_inputs(...)`: a pure function that shortens every run of placeholders (and
   the matching `attention_mask`, `labels`, `position_ids` entries), re-padding a batch
   on the side it was padded on.
2. Automatically, inside the compiled model: a forward pre-hook on the top-level model
   and an instance-level `generate` wrapper call `rewrite_inputs` whenever the prompt
   still carries the unpruned count (decided from the number of images passed), so
   `model(**processor(...))` and `model.generate(**processor(...))` just work;
   `generate` returns the caller's ids followed by the new tokens (`generation.py`).
3. `patch_processor(processor, model)`: adjusts a `LlavaProcessor`'s
   `num_additional_image_tokens` so it emits the compiled count in the first place
   (returns an undo callable; also usable as a context manager via `processor_for`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from .families import SIZE_ARGUMENTS, family_of
from .handle import compiled

__all__ = ["rewrite_inputs", "patch_processor", "processor_for", "count_images"]


def _runs(row: Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs `(start, length)` of `token_id` in a 1-D tensor."""
    pos = (row == token_id).nonzero().flatten()
    if pos.numel() == 0:
        return []
    breaks = (pos[1:] - pos[:-1] != 1).nonzero().flatten() + 1
    starts = torch.cat([pos.new_zeros(1), breaks]).tolist()
    ends = torch.cat([breaks, pos.new_tensor([pos.numel()])]).tolist()
    p = pos.tolist()
    return [(p[s], e - s) for s, e in zip(starts, ends)]


def rewrite_inputs(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    image_token_id: int,
    from_count: int,
    to_count: int,
    pad_token_id: int = 0,
) -> dict[str, Tensor | None]:
    """Shrink every image's placeholder run from `from_count` to `to_count`.

    Parameters
    ----------
    input_ids : Tensor
        ``[B, N]`` prompt ids; each image is a run of `from_count` placeholder ids
        (adjacent images form one run whose length is a multiple of `from_count`).
    attention_mask, labels, position_ids : Tensor, optional
        ``[B, N]`` companions; entries of removed placeholders are removed with them.
        `position_ids` are recomputed from the new mask (``cumsum - 1``) since the prompt
        is a different, shorter sequence.
    image_token_id, from_count, to_count : int
        Placeholder id, placeholders per image now, placeholders per image wanted.
    pad_token_id : int
        Used when samples end up with different lengths (different image counts).

    Returns
    -------
    dict
        ``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` (None where not
        given). Unchanged tensors are returned as-is when the counts already agree.
    """
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids}
    if from_count == to_count:
        return out
    if not 0 <= to_count < from_count:
        raise ValueError(f"placeholder runs can only shrink: {from_count} -> {to_count}")
    b, n = input_ids.shape
    left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    rows_ids, rows_mask, rows_labels = [], [], []
    for i in range(b):
        keep = torch.ones(n, dtype=torch.bool, device=input_ids.device)
        for start, length in _runs(input_ids[i], image_token_id):
            if length % from_count:
                raise ValueError(
                    f"sample {i}: a run of {length} image placeholders is not a multiple of "
                    f"{from_count} (placeholders per image expected)"
                )
            wanted = length // from_count * to_count
            keep[start + wanted : start + length] = False
        idx = keep.nonzero().flatten()
        rows_ids.append(input_ids[i, idx])
        rows_mask.append(attention_mask[i, idx] if attention_mask is not None else None)
        rows_labels.append(labels[i, idx] if labels is not None else None)
    length = max(r.numel() for r in rows_ids)

    def pad(rows: list[Tensor], value) -> Tensor:
        padded = []
        for r in rows:
            filler = r.new_full((length - r.numel(),), value)
            padded.append(torch.cat([filler, r]) if left else torch.cat([r, filler]))
        return torch.stack(padded)

    new_ids = pad(rows_ids, pad_token_id)
    new_mask = pad(rows_mask, 0) if attention_mask is not None else None
    if new_mask is None and any(r.numel() != length for r in rows_ids):
        # samples of different lengths need a mask to say where the padding is
        new_mask = pad([torch.ones_like(r) for r in rows_ids], 0)
    new_labels = pad(rows_labels, -100) if labels is not None else None
    new_pos = None
    if position_ids is not None:
        if new_mask is not None:
            new_pos = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 1)
        else:
            new_pos = torch.arange(length, device=input_ids.device).expand(b, -1)
        new_pos = new_pos.to(position_ids.dtype)
    return {"input_ids": new_ids, "attention_mask": new_mask, "labels": new_labels, "position_ids": new_pos}


def count_images(kwargs: dict[str, Any], crops: int = 1) -> int | None:
    """Images a forward/generate call carries (None when it carries none). `crops`: rows
    of a 4-D `pixel_values` per image (InternVL stacks every image's tiles there)."""
    pixel_values = kwargs.get("pixel_values")
    # a family's size argument has one row per image, however many crops or patches each has
    for key in SIZE_ARGUMENTS:
        sizes = kwargs.get(key)
        if isinstance(sizes, Tensor) and pixel_values is not None:
            return int(sizes.shape[0])
    if isinstance(pixel_values, Tensor):
        if pixel_values.dim() == 4:
            return int(pixel_values.shape[0]) // crops
        return int(pixel_values.shape[0] * pixel_values.shape[1])
    mm = kwargs.get("mm_encoder_outputs")
    if isinstance(mm, dict) and mm.get("image") is not None:
        pooled = getattr(mm["image"], "pooler_output", None)
        if isinstance(pooled, (list, tuple)):
            return len(pooled)
        if isinstance(pooled, Tensor):
            return int(pooled.shape[0])
    return None


def maybe_rewrite(
    kwargs: dict[str, Any], *, image_token_id: int, from_count: int, to_count: int, pad_token_id: int, crops: int = 1
) -> dict[str, Any]:
    """Rewrite the prompt in a forward/generate call's kwargs when it has the old count.

    A prompt whose placeholder total already equals ``images · to_count`` is left alone;
    one with ``images · from_count`` is rewritten; anything else is left for transformers
    to report (its "Image features and image tokens do not match").
    """
    input_ids = kwargs.get("input_ids")
    images = count_images(kwargs, crops)
    if from_count == to_count or not isinstance(input_ids, Tensor) or images is None:
        return kwargs
    total = int((input_ids == image_token_id).sum())
    if crops > 1 and not (from_count % crops or to_count % crops) and total == images * (from_count // crops):
        # SmolVLM's 5-D pixel_values count tiles, not images, and each tile's placeholders
        # are a run of their own between text tokens: shrink run by run, per tile
        from_count, to_count = from_count // crops, to_count // crops
    if total == images * to_count or total != images * from_count:
        return kwargs
    new = rewrite_inputs(
        input_ids,
        kwargs.get("attention_mask"),
        kwargs.get("labels"),
        kwargs.get("position_ids"),
        image_token_id=image_token_id,
        from_count=from_count,
        to_count=to_count,
        pad_token_id=pad_token_id,
    )
    kwargs = dict(kwargs)
    for key, value in new.items():
        if key in kwargs or value is not None and key == "attention_mask":
            kwargs[key] = value
    return kwargs


def patch_processor(processor: Any, model_or_count: Any) -> Callable[[], None]:
    """Make a `LlavaProcessor` emit the compiled model's placeholder count per image.

    Adjusts `processor.num_additional_image_tokens` by (compiled − unpruned) count, the
    one knob LlavaProcessor exposes (`num_image_tokens = patches + additional − [CLS
    dropped]`). Returns a callable that undoes the change.
    """
    if isinstance(model_or_count, int):
        raise TypeError("patch_processor needs the compiled model (it knows both counts)")
    handle = compiled(model_or_count)
    if handle is not None and family_of(handle.plan.spec).sized_per_image:
        raise TypeError(
            f"{handle.plan.spec.name}'s placeholder count depends on each image's size, which one processor "
            "setting cannot follow; pass the processor's output as is (the compiled model rewrites it)"
        )
    # an uncompiled model expects the unpruned count: nothing to adjust
    delta = 0 if handle is None else handle.image_tokens - handle.original_image_tokens
    if not hasattr(processor, "num_additional_image_tokens"):
        raise TypeError(
            f"{type(processor).__name__} has no num_additional_image_tokens; "
            "use vtdsl.compiler.rewrite_inputs on its output instead"
        )
    before = processor.num_additional_image_tokens
    processor.num_additional_image_tokens = before + delta

    def undo() -> None:
        processor.num_additional_image_tokens = before

    return undo


@contextlib.contextmanager
def processor_for(processor: Any, model: Any) -> Iterator[Any]:
    """`with processor_for(processor, compiled):` — `patch_processor`, undone on exit."""
    undo = patch_processor(processor, model)
    try:
        yield processor
    finally:
        undo()
