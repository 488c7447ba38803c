"""A user's own data: a JSONL file of image questions, read, run and scored.

One example per line, a JSON object::

    {"image": "imgs/cat.png", "question": "What animal is this?", "answer": ["cat", "kitten"], "tag": "animals"}

`image` is a path relative to the JSONL file, `answer` (or `answers`) a string or a
non-empty list of accepted strings, `tag` (or `family`) an optional group reported on its
own. Every line is checked before any model runs; all bad lines are reported at once,
each with its line and column (`DataError`, exit 2 in the CLI).

Answers are generated greedily (`generate`, so a compiled model shortens the prompt
itself) and scored two ways after normalisation (lower case, punctuation to spaces):
`exact` — the whole answer equals an accepted one; `contains` — an accepted answer
appears in it as whole words.

    examples = read_jsonl("data.jsonl")
    result = evaluate_data(loaded, [("fastv", plan)], examples)
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..lang.ast import Span
from ..lang.errors import Diagnostic, PolicyError

# Tag of an example that names none.
UNTAGGED = "untagged"
# At most this many bad lines are listed (the count of the rest is given).
MAX_REPORTED = 20


@dataclass(frozen=True)
class DataExample:
    image_path: str
    question: str
    answers: tuple[str, ...]
    tag: str = UNTAGGED
    line: int = 0

    @property
    def answer(self) -> str:
        return self.answers[0]


class DataError(PolicyError):
    """Bad lines in a data file (located diagnostics, exit 2)."""


# ---------------------------------------------------------------------- reading
def _at(line: int, text: str, key: str | None) -> Span:
    """The span of `key`'s value on a line (or the whole line)."""
    col, end = 1, max(1, len(text))
    if key is not None:
        found = re.search(rf'"{re.escape(key)}"\s*:\s*', text)
        if found:
            col, end = found.end() + 1, found.end() + 1
    return Span(line=line, column=col, end_line=line, end_column=end)


def _answers(obj: dict) -> tuple[tuple[str, ...] | None, str]:
    key = "answer" if "answer" in obj else "answers"
    value = obj.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a.strip() for a in value):
        return None, key
    return tuple(a.strip() for a in value), key


def _check_image(path: str) -> str | None:
    """What is wrong with an image file, or None (header and data decoded, not kept)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        return "not found"
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'bad data'})"
    return None


def _parse_line(text: str, line: int, base: str) -> DataExample | Diagnostic:
    """One line as an example, or the diagnostic saying what is wrong with it."""
    def bad(message: str, key: str | None = None, expected: str | None = None) -> Diagnostic:
        return Diagnostic(message, _at(line, text, key), expected=expected, code="data")

    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return Diagnostic(f"not valid JSON: {err.msg}", Span(line=line, column=err.colno, end_line=line,
                                                             end_column=err.colno), code="data")
    if not isinstance(obj, dict):
        return bad("expected a JSON object", expected='{"image": ..., "question": ..., "answer": ...}')
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        return bad("no image", "image" if "image" in obj else None, expected='"image": a path relative to the file')
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        return bad("no question", "question" if "question" in obj else None, expected='"question": a string')
    answers, key = _answers(obj)
    if answers is None:
        return bad("no answer", key if key in obj else None,
                   expected='"answer": a string or a non-empty list of strings')
    tag = obj.get("tag", obj.get("family", UNTAGGED))
    if not isinstance(tag, str) or not tag.strip():
        return bad("a tag must be a non-empty string", "tag" if "tag" in obj else "family")
    path = os.path.normpath(os.path.join(base, os.path.expanduser(image)))
    problem = _check_image(path)
    if problem:
        return bad(f"image {image!r} {problem}", "image", expected=f"an image file (looked at {path})")
    return DataExample(path, question.strip(), answers, tag.strip(), line)


def read_jsonl(path: str | os.PathLike) -> list[DataExample]:
    """Every example of a JSONL data file; `DataError` listing each bad line otherwise.
    Blank lines are skipped."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
    except UnicodeDecodeError as err:
        raise DataError(Diagnostic(f"not UTF-8 text ({err.reason} at byte {err.start})", code="data"),
                        filename=path) from None
    base = os.path.dirname(os.path.abspath(path))
    examples, problems = [], []
    for number, text in enumerate(source.split("\n"), start=1):
        if not text.strip():
            continue
        parsed = _parse_line(text.rstrip("\r"), number, base)
        (problems if isinstance(parsed, Diagnostic) else examples).append(parsed)
    if not problems and not examples:
        problems.append(Diagnostic("no examples", expected="one JSON object per line", code="data"))
    if problems:
        shown = problems[:MAX_REPORTED]
        if len(problems) > MAX_REPORTED:
            shown.append(Diagnostic(f"... and {len(problems) - MAX_REPORTED} more bad lines", code="data"))
        raise DataError(shown, source=source, filename=path)
    return examples


# ---------------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """Lower case, punctuation to spaces (inner hyphens and apostrophes kept), single spaces."""
    text = re.sub(r"[^\w\s'-]|(?<!\w)['-]|['-](?!\w)", " ", text.lower())
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize(prediction)
    return any(pred == normalize(a) for a in answers)


def contains(prediction: str, answers: Sequence[str]) -> bool:
    """An accepted answer appears in the prediction as whole words."""
    pred = f" {normalize(prediction)} "
    return any(normalize(a) and f" {normalize(a)} " in pred for a in answers)


@dataclass
class Tally:
    """Exact and contains hits per tag, and the time spent in the model's forwards."""

    exact: dict[str, int] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)
    generate_s: float = 0.0
    prefill_s: float = 0.0

    def add(self, example: DataExample, prediction: str) -> None:
        tag = example.tag
        self.total[tag] = self.total.get(tag, 0) + 1
        self.exact[tag] = self.exact.get(tag, 0) + exact_match(prediction, example.answers)
        self.hits[tag] = self.hits.get(tag, 0) + contains(prediction, example.answers)
        self.predictions.append(prediction)

    def result(self) -> dict[str, Any]:
        n = sum(self.total.values())
        return {
            "n": n,
            "exact": sum(self.exact.values()) / max(n, 1),
            "contains": sum(self.hits.values()) / max(n, 1),
            "per_tag": {t: {"n": self.total[t], "exact": self.exact[t] / self.total[t],
                            "contains": self.hits[t] / self.total[t]} for t in sorted(self.total)},
            "generate_s": self.generate_s,
            "prefill_ms_per_example": 1000 * self.prefill_s / max(n, 1),
        }


# ---------------------------------------------------------------------- running
class ForwardClock:
    """Time in `generate` (the model's forwards, image encoding included, and the greedy
    loop around them; CUDA synchronised), its prefill — from the call to the end of the
    first forward, where transformers encodes the images — apart, and what the compiled
    model kept during that prefill."""

    def __init__(self, model):
        self.model = model
        self.total = self.prefill = 0.0
        self.kept: dict[str, dict[str, tuple[int, int]]] = {}
        self._calls = 0
        self._t0 = 0.0
        self._handle = None

    def __enter__(self) -> "ForwardClock":
        self._handle = self.model.register_forward_hook(self._first_forward)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _sync(self) -> None:
        import torch

        if torch.cuda.is_available() and next(self.model.parameters()).is_cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self._calls = 0
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.total += time.perf_counter() - self._t0

    def _first_forward(self, module, args, output) -> None:
        self._calls += 1
        if self._calls == 1:
            from .. import compiler

            self._sync()
            self.prefill += time.perf_counter() - self._t0
            self.kept = compiler.kept_counts(self.model)


def prompt_text(processor: Any, question: str) -> str:
    """The model's own chat template with one image and the question when its processor
    has one (LLaVA-NeXT, Qwen2.5-VL hub directories), else the LLaVA-1.5 prompt vtbench uses."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from .bench import PROMPT_TEMPLATE

    image_token = getattr(processor, "image_token", None) or "<image>"
    return PROMPT_TEMPLATE.format(image=image_token, question=question)


def encode(processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict[str, Any]:
    """The processor's inputs for a batch (left padding, so every prompt ends where the
    answer starts)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = processor(text=[prompt_text(processor, q) for q in questions], images=list(images),
                        return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return dict(enc)


def generate_answers(loaded, inputs: dict[str, Any], max_new_tokens: int, clock: ForwardClock) -> list[str]:
    """Greedy answers (the new tokens, decoded) for one encoded batch."""
    import torch

    model = loaded.model
    param = next(model.parameters())
    moved = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
             for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock.start()
    with torch.inference_mode():
        out = model.generate(**moved, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    clock.stop()
    new = out[:, moved["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def max_new_tokens_for(loaded, requested: int | None) -> int:
    """`requested`, or 1 for a one-word vtbench model and 32 for any other."""
    if requested is not None:
        return requested
    return 1 if loaded.one_word else 32


def open_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def text_tokens(inputs: dict[str, Any], image_token_id: int | None) -> list[int]:
    """Non-image, non-padding prompt tokens of each row (the cost model's text tokens)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    keep = ids != (image_token_id if image_token_id is not None else -1)
    if mask is not None:
        keep = keep & mask.bool()
    return keep.sum(1).tolist()


# ---------------------------------------------------------------------- many policies
class Progress:
    """`k/N examples` over every policy, with the time left at the rate so far (stderr)."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.enabled, self.done = total, enabled, 0
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    def advance(self, n: int, label: str) -> None:
        self.done += n
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        print(f"\r  eval {self.done}/{self.total} examples  {label[:24]:<24}  ETA {_clock(left)}",
              end="", file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(f"\r  eval {self.done}/{self.total} examples in {_clock(time.perf_counter() - self.started)}"
                  + " " * 30, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _run_policy(loaded, plan, batch: Sequence[DataExample], inputs: dict[str, Any], images: list,
                max_new_tokens: int, tally: Tally, clock: ForwardClock, one_by_one: bool) -> None:
    """One batch under one policy (None: unpruned); adaptive counts one image at a time."""
    from contextlib import nullcontext

    from .. import compiler

    before = clock.total, clock.prefill
    with compiler.apply(plan, loaded.model, spec=plan.spec) if plan is not None else nullcontext():
        if one_by_one and len(batch) > 1:
            for ex, image in zip(batch, images):
                single = encode(loaded.processor, [image], [ex.question])
                tally.add(ex, generate_answers(loaded, single, max_new_tokens, clock)[0])
        else:
            for ex, answer in zip(batch, generate_answers(loaded, inputs, max_new_tokens, clock)):
                tally.add(ex, answer)
    tally.generate_s += clock.total - before[0]
    tally.prefill_s += clock.prefill - before[1]


def evaluate_data(loaded, plans: Sequence[tuple[str, Any]], examples: Sequence[DataExample], *,
                  batch_size: int = 16, max_new_tokens: int | None = None, progress: bool = True,
                  unpruned: bool = True) -> dict[str, Any]:
    """The unpruned model (first, unless `unpruned` is false) and every ``(name, plan)``
    on `examples`, batch by batch (each batch is read and encoded once for all of them)."""
    new_tokens = max_new_tokens_for(loaded, max_new_tokens)
    names = ["unpruned"] * unpruned + [name for name, _ in plans]
    runs = [None] * unpruned + [plan for _, plan in plans]
    tallies = [Tally() for _ in runs]
    bar = Progress(len(examples) * len(runs), progress)
    counted: list[int] = []
    with ForwardClock(loaded.model) as clock:
        try:
            for start in range(0, len(examples), batch_size):
                batch = examples[start:start + batch_size]
                images = [open_image(ex.image_path) for ex in batch]
                inputs = encode(loaded.processor, images, [ex.question for ex in batch])
                counted += text_tokens(inputs, loaded.spec.image_token_id)
                for name, plan, tally in zip(names, runs, tallies):
                    one_by_one = plan is not None and plan.adaptive
                    _run_policy(loaded, plan, batch, inputs, images, new_tokens, tally, clock, one_by_one)
                    bar.advance(len(batch), name)
        finally:
            bar.close()
    mean_text = round(sum(counted) / max(len(counted), 1))
    return _summary(loaded, names, runs, [t.result() for t in tallies], mean_text, len(examples), new_tokens)


def _summary(loaded, names, runs, results, mean_text: int, n: int, new_tokens: int) -> dict[str, Any]:
    from ..cost import estimate

    base = results[0] if runs and runs[0] is None else None
    rows = []
    for name, plan, res in zip(names, runs, results):
        tokens = loaded.spec.image_tokens if plan is None else plan.visual_tokens_to_llm
        ratio = 1.0 if plan is None else estimate(plan, text_tokens=mean_text).flops_ratio
        rows.append({
            "policy": name, "visual_tokens_to_llm": tokens, "bound": bool(plan is not None and plan.adaptive),
            "flops_ratio": ratio, "exact": res["exact"], "contains": res["contains"],
            "retention": res["exact"] / base["exact"] if base and base["exact"] else None,
            "per_tag": res["per_tag"], "prefill_ms_per_example": res["prefill_ms_per_example"],
            "generate_s": res["generate_s"],
            "latency_ratio": res["generate_s"] / base["generate_s"] if base and base["generate_s"] else None,
        })
    return {"model": loaded.spec.name, "weights": loaded.path, "device": loaded.device, "dtype": loaded.dtype,
            "examples": n, "text_tokens": mean_text, "max_new_tokens": new_tokens, "results": rows}


def render_table(result: dict[str, Any]) -> str:
    """Rows of policies: tokens, FLOPs, latency, exact, contains, retention, exact per tag."""
    rows = result["results"]
    tags = list(rows[0]["per_tag"]) if rows else []
    head = ["policy", "tokens", "FLOPs", "latency", "exact", "contains", "retention", *tags]
    table = [head]
    for r in rows:
        bound = "≤ " if r["bound"] else ""
        table.append([
            r["policy"], bound + str(r["visual_tokens_to_llm"]), bound + f"{100 * r['flops_ratio']:.1f}%",
            f"{r['latency_ratio']:.2f}x" if r["latency_ratio"] is not None else "-",
            f"{100 * r['exact']:.1f}", f"{100 * r['contains']:.1f}",
            f"{100 * r['retention']:.1f}%" if r["retention"] is not None else "-",
            *(f"{100 * r['per_tag'][t]['exact']:.1f}" if t in r["per_tag"] else "-" for t in tags),
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [f"{result['model']}: {result['examples']} examples, {result['text_tokens']} text tokens per prompt, "
             f"up to {result['max_new_tokens']} new tokens"]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)
