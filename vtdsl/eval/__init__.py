"""Evaluation: the vtbench synthetic benchmark, the accuracy harness, and training of the
tiny-llava-vtbench model that gives pruning policies a real accuracy signal.

- `vtdsl.eval.bench`   — seeded scene/question generator (`generate`, `Example`).
- `vtdsl.eval.harness` — `evaluate(model, examples, tokenizer, ...)`: per-family accuracy
  and prefill latency for any LlavaForConditionalGeneration.
- `vtdsl.eval.train`   — training of tiny-llava-vtbench (`examples/train_tiny_vlm.py`).
- `vtdsl.eval.compare` — policies side by side (`vtdsl eval`).
- `vtdsl.eval.show`    — kept-token pictures (`vtdsl show`).

Attributes are imported lazily (the generator needs only PIL; the harness needs torch).
"""

from .._lazy import lazy_attributes

__getattr__, __all__ = lazy_attributes(__name__, {
    "vtdsl.eval.bench": ("Example", "generate", "FAMILIES"),
    "vtdsl.eval.harness": ("evaluate", "format_result"),
})
