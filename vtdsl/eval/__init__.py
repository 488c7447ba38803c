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

from importlib import import_module

_EXPORTS = {
    "Example": ("vtdsl.eval.bench", "Example"),
    "generate": ("vtdsl.eval.bench", "generate"),
    "FAMILIES": ("vtdsl.eval.bench", "FAMILIES"),
    "evaluate": ("vtdsl.eval.harness", "evaluate"),
    "format_result": ("vtdsl.eval.harness", "format_result"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'vtdsl.eval' has no attribute {name!r}")
