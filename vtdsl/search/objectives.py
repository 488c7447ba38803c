"""What a search candidate is scored by. Higher is better for every objective.

An objective is made once per process by `make_objective(name, spec, **options)` and
called with each feasible candidate's checked `Plan`; it returns a dict with at least
`score` (a float) and any other metrics worth recording. Heavy set-up (building the
model, the unpruned reference run) happens on the first call, so a search whose
candidates are all rejected by the cost model never builds a model.

- `agreement`: next-token agreement with the unpruned model on calibration prompts
  (random images and fixed random prompts, seeded) - any model.
- `accuracy`: vtbench validation accuracy of `tiny-llava-vtbench` (needs vtdsl.eval and
  the trained model); with `data` (a JSONL file, `vtdsl.eval.data`), exact-match accuracy
  on those examples of any model with weights (`weights`, or the spec's own).
- `_test-cost`: scores a candidate by its cost alone (the FLOPs ratio); never runs a
  model. For tests and dry runs; `VTDSL_TEST_OBJECTIVE_SLEEP` (seconds) makes each call
  sleep, so that tests can interrupt a search mid-way.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable


PUBLIC = ("agreement", "accuracy")
DEFAULT_PROMPTS = 4
DEFAULT_POSITIONS = 8  # next-token predictions per prompt: the text after the image
ACCURACY_EXAMPLES = 256


class SearchError(Exception):
    """A search cannot start (bad option, missing model, another study): exit 2."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint

    def format(self) -> str:
        return f"error: {self.message}" + (f"\n  hint: {self.hint}" if self.hint else "")


class ObjectiveUnavailable(SearchError):
    """The objective cannot run here (a model or package it needs is missing)."""


def _unavailable(message: str, hint: str | None = None) -> ObjectiveUnavailable:
    return ObjectiveUnavailable(message, hint)


def vtbench_missing(name: str = "tiny-llava-vtbench") -> str | None:
    """Why the shipped vtbench model `name` cannot be loaded, or None when its files are there."""
    try:
        from ..models.vtbench import SHIPPED_DIRS
    except ImportError as exc:
        return f"vtdsl.models.vtbench cannot be imported ({exc})"
    if not (SHIPPED_DIRS[name] / "config.json").is_file():
        return f"{SHIPPED_DIRS[name]} holds no trained model"
    return None


# ---------------------------------------------------------------------------------------
# agreement


class Agreement:
    """Top-1 agreement and KL divergence of the next-token distributions versus the
    unpruned model, at the last `positions` text positions of `prompts` calibration
    prompts (n = prompts x positions predictions).

    score = agreement - kl / (1 + kl) / (n + 1)

    Agreement comes in steps of 1/n and the KL term is below 1/(n + 1), so the score
    orders candidates by agreement first and breaks ties by lower KL.
    """

    name = "agreement"

    def __init__(self, spec, *, weights: str | None = None, prompts: int = DEFAULT_PROMPTS,
                 positions: int = DEFAULT_POSITIONS, seed: int = 0, model=None):
        if spec.vit_crops != 1:
            raise _unavailable(f"the agreement objective needs a single-crop model; '{spec.name}' uses "
                               f"{spec.vit_crops} crops")
        self.spec = spec
        self.weights = weights
        self.prompts = prompts
        self.positions = positions
        self.seed = seed
        self.model = model
        self._inputs = None
        self._ref = None

    def setup(self) -> None:
        import torch

        if self.model is None:
            if self.weights:
                from ..models import load_weights

                self.model = load_weights(self.spec, self.weights)
            else:
                self.model = self.spec.build(device="cpu", seed=0)
        self.model.eval()
        config = self.model.config
        image_id = getattr(config, "image_token_id", None)
        if image_id is None:
            image_id = getattr(config, "image_token_index")
        vocab = config.text_config.vocab_size
        pad = getattr(config, "pad_token_id", None)
        if pad is None:
            pad = getattr(config.text_config, "pad_token_id", None)
        banned = {image_id, pad}
        g = torch.Generator().manual_seed(self.seed)
        k, m, p = self.prompts, self.positions, self.spec.image_tokens
        ids = torch.randint(0, vocab, (k, 3 + p + m), generator=g)
        for bad in banned - {None}:  # keep placeholder / pad ids out of the text
            ids[ids == bad] = (bad + 1) % vocab if (bad + 1) % vocab not in banned else (bad + 2) % vocab
        ids[:, 3:3 + p] = image_id
        size = self.spec.image_size
        pixels = torch.randn(k, self.spec.channels, size, size, generator=g)
        self._inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
        self._ref = self._log_probs()

    def _log_probs(self):
        import torch

        with torch.inference_mode():
            out = self.model(**self._inputs, logits_to_keep=self.positions, use_cache=False)
        return torch.log_softmax(out.logits[:, -self.positions:].double(), dim=-1)

    def __call__(self, plan) -> dict[str, Any]:
        from .. import compiler

        if self._ref is None:
            self.setup()
        with compiler.apply(plan, self.model, spec=self.spec):
            logp = self._log_probs()
        ref = self._ref
        agree = (logp.argmax(-1) == ref.argmax(-1)).double().mean().item()
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        kl = max(kl, 0.0)
        n = ref.shape[0] * ref.shape[1]
        score = agree - (kl / (1 + kl)) / (n + 1) if math.isfinite(kl) else agree - 1 / (n + 1)
        return {"score": score, "agreement": agree, "kl": kl, "predictions": n}


# ---------------------------------------------------------------------------------------
# accuracy (vtbench)


class Accuracy:
    """vtbench validation accuracy (greedy first-token exact match) of a shipped vtbench
    model: tiny-llava-vtbench2 on v2's scenes, tiny-llava-vtbench on v1's."""

    name = "accuracy"
    MODELS = ("tiny-llava-vtbench2", "tiny-llava-vtbench")

    def __new__(cls, spec, *, data: str | None = None, **_: Any):
        # a user's own examples (`data`): any model with weights, scored by DataAccuracy
        return super().__new__(DataAccuracy if data is not None and cls is Accuracy else cls)

    def __init__(self, spec, *, examples: int = ACCURACY_EXAMPLES, weights: str | None = None, **_: Any):
        if spec.name not in self.MODELS:
            raise _unavailable(f"the accuracy objective is defined for {' and '.join(map(repr, self.MODELS))}, "
                               f"not '{spec.name}'",
                               hint=f"use --model {self.MODELS[0]}, or --objective agreement for any model")
        self.spec = spec
        self.n = examples
        self.weights = weights
        self.model = self.processor = self.examples = None

    def setup(self) -> None:
        name = self.spec.name
        script = "examples/train_tiny_vlm2.py" if name == self.MODELS[0] else "examples/train_tiny_vlm.py"
        missing = vtbench_missing(name)
        if missing:
            raise _unavailable(f"the trained model '{name}' is not available: {missing}",
                               hint=f"it ships with vtbench ({script} trains it); until then use --objective agreement")
        try:
            from ..eval import harness
            from ..eval.suites import bench_for
            from ..models.vtbench import load_processor, load_tiny_vtbench
        except ImportError as exc:
            raise _unavailable(f"the accuracy objective needs vtdsl.eval, which cannot be imported ({exc})",
                               hint="use --objective agreement until vtbench ships") from None
        try:
            if self.weights:
                from ..models import load_weights

                self.model, self.processor = load_weights(self.spec, self.weights), load_processor(name)
            else:
                self.model, self.processor = load_tiny_vtbench(name=name)
        except (OSError, ValueError, ImportError) as exc:
            raise _unavailable(f"the trained model '{name}' is not available ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})",
                               hint=f"train it with {script}, or use --objective agreement") from None
        self._evaluate = harness.evaluate
        self.examples = bench_for(self.spec).generate("val", self.n)

    def __call__(self, plan) -> dict[str, Any]:
        from .. import compiler

        if self.model is None:
            self.setup()
        with compiler.apply(plan, self.model, spec=self.spec):
            result = self._evaluate(self.model, self.examples, self.processor, progress=False)
        return {"score": float(result["overall"]), "accuracy": float(result["overall"]),
                "per_family": result.get("per_family"), "examples": result.get("n")}


class DataAccuracy(Accuracy):
    """Exact-match accuracy on the first `examples` lines of a JSONL data file
    (`vtdsl.eval.data`), greedy answers of the model in `weights` (default: the spec's own
    weights: tiny-llava-vtbench or the model directory searched)."""

    def __init__(self, spec, *, examples: int = ACCURACY_EXAMPLES, weights: str | None = None,
                 data: str | None = None, **_: Any):
        self.spec, self.n, self.data = spec, examples, data
        self.weights = weights or (spec.source if spec.source else spec.name)
        self.loaded = self.examples = None
        self.model = None

    def setup(self) -> None:
        from ..eval.data import read_jsonl
        from ..lang.errors import PolicyError
        from ..models.loading import load_pretrained

        try:
            self.examples = read_jsonl(self.data)[:self.n]
        except PolicyError as err:
            raise _unavailable(f"--data: {err.format().splitlines()[0]}") from None
        except OSError as exc:
            raise _unavailable(f"--data: cannot read {self.data} ({exc.strerror or exc})") from None
        try:
            self.loaded = load_pretrained(self.weights, device="auto")
        except (OSError, ValueError) as exc:
            raise _unavailable(f"no weights to score --data with ({exc})",
                               hint="pass --weights DIR (a local HF model directory)") from None
        self.model = self.loaded.model

    def __call__(self, plan) -> dict[str, Any]:
        from ..eval.data import evaluate_data

        if self.loaded is None:
            self.setup()
        row = evaluate_data(self.loaded, [("candidate", plan)], self.examples, progress=False,
                            unpruned=False)["results"][0]
        return {"score": float(row["exact"]), "accuracy": float(row["exact"]), "contains": float(row["contains"]),
                "per_tag": {t: v["exact"] for t, v in row["per_tag"].items()}, "examples": len(self.examples)}


def check_accuracy_available(spec) -> None:
    """Fail early (exit 2) when the accuracy objective cannot run."""
    obj = Accuracy(spec)
    obj.setup()


# ---------------------------------------------------------------------------------------
# _test-cost


class CostOnly:
    """Scores by cost only: the FLOPs ratio (more compute within the budget scores higher).
    For tests: never builds a model."""

    name = "_test-cost"

    def __init__(self, spec, *, text_tokens: int = 64, **_: Any):
        self.spec = spec
        self.text_tokens = text_tokens
        self.calls = 0

    def __call__(self, plan) -> dict[str, Any]:
        from ..cost import estimate

        self.calls += 1
        delay = float(os.environ.get("VTDSL_TEST_OBJECTIVE_SLEEP", "0") or 0)
        if delay > 0:
            time.sleep(delay)
        report = estimate(plan, text_tokens=self.text_tokens)
        return {"score": float(report.flops_ratio)}


OBJECTIVES: dict[str, Callable[..., Callable]] = {
    "agreement": Agreement,
    "accuracy": Accuracy,
    "_test-cost": CostOnly,
}


def make_objective(name: str, spec, **options: Any) -> Callable:
    """An objective by name; options it does not take are ignored."""
    import inspect

    if name not in OBJECTIVES:
        from ..lang.errors import did_you_mean

        raise SearchError(f"unknown objective '{name}' (expected {' or '.join(PUBLIC)})",
                          hint=did_you_mean(name, list(PUBLIC)))
    factory = OBJECTIVES[name]
    params = inspect.signature(factory.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return factory(spec, **options)
