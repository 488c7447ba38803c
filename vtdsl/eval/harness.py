"""Accuracy harness: batched greedy first-token exact match on vtbench-style examples.

`evaluate` works for any `LlavaForConditionalGeneration`. The number of ``<image>``
placeholders per prompt is a parameter (`image_tokens`), so a model whose policy changes
the number of visual tokens entering the LLM can be evaluated by passing the new count,
or by passing `prepare_inputs`, a callable that rewrites the batch (e.g. the compiler's
input-id rewrite helper) just before the forward pass.

Prompts are LLaVA-1.5 style (``USER: <image>\\n{question} ASSISTANT:``), batched with
left padding; `position_ids` are computed from the attention mask so a padded prompt
sees the same positions as an unpadded one. Only the prefill is run (the greedy first
token is the argmax of the last position's logits, exactly what ``generate`` would emit
first). Prefill latency is the wall time of the model's forward pass alone, excluding
preprocessing.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from vtdsl.eval.bench import Example, prompt

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _split_processor(tokenizer: Any) -> tuple[Any, Any]:
    """(tokenizer, image_processor or None) from a processor or a bare tokenizer."""
    if hasattr(tokenizer, "image_processor") and hasattr(tokenizer, "tokenizer"):
        return tokenizer.tokenizer, tokenizer.image_processor
    return tokenizer, None


def default_image_tokens(config: Any) -> int:
    """Visual tokens per image entering the LLM of an unpruned single-crop LLaVA."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def images_to_pixels(images: Sequence[Any], image_processor: Any = None,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Pixel values for a batch of PIL images. With an image processor, its output;
    without one, a fast path (rescale + normalise, no resize) for images already at the
    model's size. For vtbench images both give identical tensors."""
    if image_processor is not None:
        return image_processor(list(images), return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    return normalize_uint8(x.permute(0, 3, 1, 2), mean, std)


def normalize_uint8(x: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 NCHW -> normalised float32 pixel values (as CLIPImageProcessor computes)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() * (1 / 255) - m) / s


def encode_prompts(tokenizer: Any, questions: Sequence[str], image_tokens: int,
                   image_token: str | None = None) -> dict[str, torch.Tensor]:
    """Left-padded input_ids / attention_mask / position_ids for LLaVA prompts with
    `image_tokens` placeholders each."""
    image_token = image_token or getattr(tokenizer, "image_token", None) or "<image>"
    texts = [prompt(q, image_tokens, image_token) for q in questions]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    mask = enc["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": position_ids}


def _batches(seq: Sequence[Example], size: int) -> Iterable[Sequence[Example]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def evaluate(
    model: Any,
    examples: Sequence[Example],
    tokenizer: Any,
    batch_size: int = 32,
    progress: bool = True,
    *,
    image_tokens: int | None = None,
    image_processor: Any = None,
    prepare_inputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Greedy first-token exact-match accuracy, per family and overall.

    Parameters
    ----------
    model : LlavaForConditionalGeneration (any size; put in eval mode by the caller or here).
    examples : vtbench `Example`s (or anything with image / question / answer / family).
    tokenizer : a `LlavaProcessor` (its tokenizer and image processor are used) or a
        tokenizer (then `image_processor`, or the fast CLIP-normalisation path, is used).
    image_tokens : ``<image>`` placeholders per prompt; default: the unpruned count
        from the model config.
    prepare_inputs : optional rewrite of each batch (``input_ids``, ``attention_mask``,
        ``position_ids``, ``pixel_values``) before the forward pass.

    Returns
    -------
    dict with ``overall``, ``per_family`` (accuracy in [0, 1]), ``n``, ``counts`` (per
    family), ``image_tokens``, ``prefill_s`` (total forward time), ``prefill_ms_per_example``,
    ``prefill_ms_per_batch`` and, if asked, ``predictions``.
    """
    tok, proc_images = _split_processor(tokenizer)
    image_processor = image_processor or proc_images
    if image_tokens is None:
        image_tokens = default_image_tokens(model.config)
    was_training = model.training
    model.eval()
    tally = _Tally()
    try:
        with torch.inference_mode():
            for batch in _batches(examples, batch_size):
                inputs = _batch_inputs(model, tok, batch, image_tokens, image_processor, prepare_inputs)
                logits, seconds = _timed_prefill(model, inputs)
                tally.add(batch, [tok.decode([pid]).strip().lower() for pid in logits[:, -1].argmax(-1).tolist()],
                          seconds)
                if progress:
                    print(f"\r  eval {tally.done}/{len(examples)}", end="", file=sys.stderr, flush=True)
    finally:
        if progress:
            print(file=sys.stderr)
        model.train(was_training)
    return tally.result(image_tokens, return_predictions)


def _batch_inputs(model: Any, tok: Any, batch: Sequence[Example], image_tokens: int, image_processor: Any,
                  prepare_inputs: Callable | None) -> dict[str, torch.Tensor]:
    """One batch's prompts and pixels (rewritten by `prepare_inputs`), on the model's
    device, pixels in its dtype."""
    inputs = encode_prompts(tok, [ex.question for ex in batch], image_tokens)
    inputs["pixel_values"] = images_to_pixels([ex.image for ex in batch], image_processor)
    if prepare_inputs is not None:
        inputs = prepare_inputs(inputs)
    param = next(model.parameters())
    inputs["pixel_values"] = inputs["pixel_values"].to(param.device, param.dtype)
    return {k: v.to(param.device) for k, v in inputs.items()}


def _timed_prefill(model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The last position's logits and the wall time of the forward alone."""
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    out = model(**inputs, logits_to_keep=1, use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out.logits, time.perf_counter() - t0


@dataclass
class _Tally:
    """Answers and prefill time as batches come in; `result` is what `evaluate` returns."""

    correct: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    predictions: list[str] = field(default_factory=list)
    prefill_s: float = 0.0
    batches: int = 0
    done: int = 0

    def add(self, batch: Sequence[Example], predicted: list[str], seconds: float) -> None:
        self.prefill_s += seconds
        self.batches += 1
        for ex, pred in zip(batch, predicted):
            self.predictions.append(pred)
            self.total[ex.family] += 1
            self.correct[ex.family] += int(pred == ex.answer.strip().lower())
        self.done += len(batch)

    def result(self, image_tokens: int, return_predictions: bool) -> dict[str, Any]:
        n = sum(self.total.values())
        result: dict[str, Any] = {
            "overall": sum(self.correct.values()) / max(n, 1),
            "per_family": {f: self.correct[f] / self.total[f] for f in sorted(self.total)},
            "n": n,
            "counts": dict(sorted(self.total.items())),
            "image_tokens": image_tokens,
            "prefill_s": self.prefill_s,
            "prefill_ms_per_example": 1000 * self.prefill_s / max(n, 1),
            "prefill_ms_per_batch": 1000 * self.prefill_s / max(self.batches, 1),
        }
        if return_predictions:
            result["predictions"] = self.predictions
        return result


def format_result(result: dict[str, Any]) -> str:
    """One line: overall and per-family accuracy in percent, and prefill latency."""
    fams = " ".join(f"{f} {100 * a:.1f}" for f, a in result["per_family"].items())
    return (f"overall {100 * result['overall']:.1f} | {fams} | "
            f"prefill {result['prefill_ms_per_example']:.2f} ms/ex (n={result['n']}, "
            f"{result['image_tokens']} image tokens)")
