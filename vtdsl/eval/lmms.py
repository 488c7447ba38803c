"""vtdsl as an lmms-eval model: any lmms-eval task run on a model with a policy compiled in.

    lmms-eval --model vtdsl --model_args pretrained=DIR,policy=policies/fastv.vt \\
        --tasks TASK --batch_size 2 --output_path out/

`pretrained` is ``tiny-llava-vtbench`` (shipped) or a local HF model directory of a
registered family (`vtdsl.models.loading.load_pretrained`); `policy` a ``.vt``/``.yaml`` file
checked against that model (omitted: the unpruned model); `dtype` and `device` as in
``vtdsl run``; `report` a JSON file to write what the policy did (below). lmms-eval finds
the class through the ``lmms_eval.models`` entry point that vtdsl's package metadata
declares (`manifest`), so nothing has to be set in the environment.

Prompts, batching and greedy decoding are those of ``vtdsl eval --data``
(`vtdsl.eval.data.encode` / `generate_answers`): the task's context is the question, the
model's own chat template (or the LLaVA-1.5 prompt) wraps it, so the same examples give
the same answers. A task's ``max_new_tokens`` wins over vtdsl's default (1 for a
vtbench-trained model, 32 otherwise); its ``until`` strings cut the answer.

What the policy did reaches the results file the one way lmms-eval 0.7 lets a model add
to it, `log_metrics`: numbers only, averaged over the examples, under ``throughput`` as
``avg_vtdsl_flops_ratio``, ``avg_vtdsl_visual_tokens_to_llm`` and
``avg_vtdsl_kept_<site>`` (``avg_vtdsl_kept_llm_layer2_0``: visual tokens per image after the
stage at ``llm.layer2``). The policy itself is echoed by ``config.model_args`` (its path);
its text is logged, and with ``report=FILE`` written to FILE as JSON beside the same means,
per request type (also `VtdslModel.summary`).

This module is the only one that imports lmms_eval, and nothing else in vtdsl imports it.
"""

from __future__ import annotations

from typing import Any, Sequence

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

# The name given to `--model`.
MODEL_ID = "vtdsl"
# Prefix of the numbers this model adds to lmms-eval's results.
METRIC_PREFIX = "vtdsl_"


def manifest():
    """The ``lmms_eval.models`` entry point: where lmms-eval finds the model class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VtdslModel")


class VtdslModel(lmms):
    """A vtdsl-compiled model behind lmms-eval's `lmms` interface (image-text tasks, one
    image per question): `generate_until` and `loglikelihood`."""

    def __init__(self, pretrained: str = "tiny-llava-vtbench", policy: str | None = None, dtype: str = "auto",
                 device: str | None = "auto", batch_size: int | str = 1, max_batch_size: int | None = None,
                 report: str | None = None) -> None:
        # max_batch_size only matters to lmms-eval's automatic batch size, which takes no effect here
        super().__init__()
        from .. import compiler
        from ..models.loading import load_pretrained

        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 0
        if self.batch_size < 1:
            raise ValueError(f"vtdsl: batch_size must be a whole number >= 1, not {batch_size!r} "
                             "(lmms-eval's automatic sizing is not supported)")
        self.loaded = load_pretrained(pretrained, device=device or "auto", dtype=dtype)
        self.policy_text, self.policy_file, self.report = "", policy, report
        self.plan = None
        if policy:
            with open(policy, encoding="utf-8") as fh:
                self.policy_text = fh.read()
            self.plan = compiler.resolve_plan(policy, self.loaded.model, spec=self.loaded.spec)
            compiler.compile(self.plan, self.loaded.model)
        self.policy_name = (self.plan.policy.name or policy) if self.plan is not None else "unpruned"
        self._records: list[dict[str, float]] = []
        self._new_tokens = 0
        self.summary: dict[str, dict[str, Any]] = {}
        eval_logger.info(f"vtdsl: {self.loaded.spec.name} from {self.loaded.path} ({self.loaded.device}, "
                         f"{self.loaded.dtype}), policy {self.policy_name}\n{self.policy_text}")

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Instance]) -> list[str]:
        from .data import ForwardClock

        answers: list[str] = [""] * len(requests)
        self._records, self._new_tokens = [], 0
        with ForwardClock(self.loaded.model) as clock:
            for batch in self._batches(requests):
                self._generate_batch(requests, batch, answers, clock)
        self._report("generate_until", clock.total, len(requests))
        return answers

    def _batches(self, requests: Sequence[Instance]) -> list[list[int]]:
        """Request indices in order, `batch_size` at a time; a batch never mixes tasks or
        generation settings, and an adaptive policy (its count depends on the image) runs
        one image at a time, as ``vtdsl eval --data`` does."""
        size = 1 if self.plan is not None and self.plan.adaptive else self.batch_size
        batches: list[list[int]] = []
        last_key = None
        for i, req in enumerate(requests):
            _, gen_kwargs, _, _, task, split = req.args[:6]
            key = (task, split, repr(sorted((gen_kwargs or {}).items())))
            if batches and key == last_key and len(batches[-1]) < size:
                batches[-1].append(i)
            else:
                batches.append([i])
            last_key = key
        return batches

    def _generate_batch(self, requests, batch: list[int], answers: list[str], clock) -> None:
        from .data import encode, generate_answers, max_new_tokens_for

        contexts, images = zip(*(self._question_and_image(requests[i]) for i in batch))
        gen_kwargs = dict(requests[batch[0]].args[1] or {})
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            eval_logger.warning("vtdsl: the task asks for sampling; answers are greedy, as in `vtdsl eval`")
        new_tokens = max_new_tokens_for(self.loaded, gen_kwargs.get("max_new_tokens"))
        inputs = encode(self.loaded.processor, list(images), list(contexts))
        texts = generate_answers(self.loaded, inputs, new_tokens, clock)
        until = gen_kwargs.get("until") or []
        tokenizer = getattr(self.loaded.processor, "tokenizer", self.loaded.processor)
        for i, text, image, n_text in zip(batch, texts, images, self._text_tokens(inputs)):
            answers[i] = _cut(text, [until] if isinstance(until, str) else until)
            self._new_tokens += len(tokenizer(answers[i], add_special_tokens=False)["input_ids"])
            self._records.append(self._record(image, n_text, clock.kept))

    def _question_and_image(self, request: Instance):
        context, _, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            raise ValueError(f"vtdsl: task {task!r} doc {doc_id} gives {len(visuals)} visuals; vtdsl models answer "
                             "about exactly one image (a PIL image) per question")
        return context, visuals[0].convert("RGB")

    def _text_tokens(self, inputs) -> list[int]:
        from .data import text_tokens

        return text_tokens(inputs, self.loaded.spec.image_token_id)

    # ------------------------------------------------------------------ log-likelihood
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities after the prompt, and whether
        greedy decoding would produce it, one request at a time.

        The continuation is fed to the compiled `generate` one forced token at a time, not
        appended to the prompt in one forward: a text-guided policy (FastV ranks the image
        tokens by the last prompt token's attention) must choose what to keep from the
        prompt alone, as it does when the model answers."""
        from .data import ForwardClock

        out = []
        self._records, self._new_tokens = [], 0
        with ForwardClock(self.loaded.model) as clock:
            for req in requests:
                out.append(self._loglikelihood_one(req, clock))
        self._report("loglikelihood", clock.total, len(requests))
        return out

    def _loglikelihood_one(self, request: Instance, clock) -> tuple[float, bool]:
        import torch

        from .data import encode, prompt_text

        _, target, _, doc_id, task, split = request.args[:6]
        question, image = self._question_and_image(request)
        continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
        inputs = encode(self.loaded.processor, [image], [question])
        whole = self.loaded.processor(text=[prompt_text(self.loaded.processor, question) + continuation],
                                      images=[image], return_tensors="pt")
        wanted = whole["input_ids"][0, inputs["input_ids"].shape[1]:]
        if wanted.numel() < 1:
            raise ValueError(f"vtdsl: task {task!r} doc {doc_id}: the continuation {continuation!r} adds no token")
        logits = self._forced_logits(inputs, wanted, clock)
        scores = torch.log_softmax(logits.float(), dim=-1)
        self._new_tokens += int(wanted.numel())
        self._records.append(self._record(image, self._text_tokens(inputs)[0], clock.kept))
        chosen = scores.gather(-1, wanted[:, None].to(scores.device))
        return float(chosen.sum()), bool((scores.argmax(-1).cpu() == wanted).all())

    def _forced_logits(self, inputs: dict[str, Any], wanted, clock):
        """The raw logits of each step of `generate` made to emit `wanted`."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        class Force(LogitsProcessor):
            step = 0

            def __call__(self, input_ids, scores):
                forced = torch.full_like(scores, float("-inf"))
                forced[:, int(wanted[self.step])] = 0.0
                self.step += 1
                return forced

        model = self.loaded.model
        param = next(model.parameters())
        moved = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
                 for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        tokenizer = getattr(self.loaded.processor, "tokenizer", self.loaded.processor)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        clock.start()
        with torch.inference_mode():
            out = model.generate(**moved, max_new_tokens=int(wanted.numel()), min_new_tokens=int(wanted.numel()),
                                 do_sample=False, pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
                                 logits_processor=LogitsProcessorList([Force()]))
        clock.stop()
        return torch.cat([step[:1] for step in out.logits], dim=0)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtdsl: multi-round generation is not supported (neither is it by llava_hf)")

    # ------------------------------------------------------------------ what the policy did
    def _record(self, image, n_text: int, kept: dict[str, dict[str, tuple[int, int]]]) -> dict[str, float]:
        """One example's FLOPs ratio (for its image size and prompt, as ``vtdsl run``) and the
        visual tokens each stage kept in its prefill."""
        from ..cost import estimate
        from ..ir import check

        row: dict[str, float] = {"flops_ratio": 1.0, "visual_tokens_to_llm": float(self.loaded.spec.image_tokens)}
        if self.plan is None:
            return row
        sized = self.loaded.spec.for_image(image.height, image.width)
        costed = self.plan if sized is self.loaded.spec else check(self.plan.policy, sized)
        row["flops_ratio"] = estimate(costed, text_tokens=n_text).flops_ratio
        row["visual_tokens_to_llm"] = float(costed.visual_tokens_to_llm)
        for tower in ("vit", "llm"):
            for site, (_, n_out) in kept.get(tower, {}).items():
                row[f"kept_{_key(site)}"] = float(n_out)
        return row

    def _report(self, kind: str, seconds: float, n: int) -> None:
        """Means over the examples, into lmms-eval's results (`log_metrics`), `summary[kind]`
        and the `report` file (JSON, with the policy's text); the time is the model's own
        (`ForwardClock`), the tokens those of the answers."""
        import json

        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        keys = list(dict.fromkeys(k for row in self._records for k in row))
        means = {k: sum(row.get(k, 0.0) for row in self._records) / max(len(self._records), 1) for k in keys}
        self.summary[kind] = {"model": self.loaded.spec.name, "weights": self.loaded.path, "policy": self.policy_name,
                              "policy_file": self.policy_file, "policy_text": self.policy_text, "examples": n, **means}
        if self.report:
            with open(self.report, "w", encoding="utf-8") as fh:
                json.dump(self.summary, fh, indent=2)
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=self._new_tokens,
                    avg_speed=self._new_tokens / seconds if seconds > 0 else 0.0,
                    additional_metrics={METRIC_PREFIX + k: v for k, v in means.items()})


def _key(site: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in site)


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first of the task's stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()

