"""vtdsl as an lmms-eval model (issue 17): `--model vtdsl` runs an lmms-eval task, here the
task of tests/fixtures/lmms over vtbench examples exported as a vtdsl data file, and its
accuracy equals `vtdsl eval --data` on the same file, batch 1 and 2; the FLOPs ratio and
the kept counts reach lmms-eval's results; `loglikelihood` agrees with what `generate`
scores; lmms-eval finds the model through vtdsl's entry point, and nothing else in vtdsl
imports lmms-eval.

lmms-eval is the optional extra vtdsl[lmms]; scripts/setup.sh installs it, so CI runs this.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

# not skipped when absent: scripts/setup.sh always installs the lmms extra, so a missing
# lmms-eval is a broken set-up, and this file must say so rather than pass quietly
import lmms_eval  # noqa: E402,F401

from test_architecture import import_graph  # noqa: E402
from test_eval_data import write_vtbench  # noqa: E402

from vtdsl.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lmms"
FASTV = ROOT / "policies" / "fastv.vt"
N = 24
# tiny-llava-vtbench: a 12 x 12 patch grid, no CLS token into the LLM
IMAGE_TOKENS = 144

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """N vtbench test examples as a data file, the task folder pointing at it, and
    `vtdsl eval --data` on that file (fastv and unpruned)."""
    root = tmp_path_factory.mktemp("lmms")
    data, _ = write_vtbench(root / "data", N, split="test")
    folder = root / "task"
    folder.mkdir()
    yaml = (FIXTURE / "vtdsl_data.yaml").read_text()
    assert "/path/to/data.jsonl" in yaml
    (folder / "vtdsl_data.yaml").write_text(yaml.replace("/path/to/data.jsonl", str(data)))
    shutil.copy(FIXTURE / "utils.py", folder / "utils.py")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(root / "datasets-cache"))
        # as written (the lmms-eval model runs it so): without its `model "llava-1.5-7b"` line,
        # which `eval` would refuse on tiny-llava-vtbench unless rescaled
        as_written = root / "fastv.vt"
        as_written.write_text("".join(line for line in FASTV.read_text().splitlines(keepends=True)
                                      if not line.startswith("model ")))
        out = CliRunner().invoke(main, ["eval", str(as_written), "--data", str(data), "--json", "--device", "cpu"])
        assert out.exit_code == 0, out.output
        reference = {row["policy"]: row for row in json.loads(out.stdout)["results"]}
        yield {"data": data, "folder": folder, "reference": reference}


def _simple_evaluate(task, model_args: str, batch_size: int) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task["folder"]), include_defaults=False)
    return simple_evaluate(model="vtdsl", model_args=model_args, tasks=["vtdsl_data"], batch_size=batch_size,
                           task_manager=manager, log_samples=False)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lmms_eval_accuracy_equals_vtdsl_eval_data(task, batch_size):
    report = task["data"].parent / f"report-{batch_size}.json"
    args = f"pretrained=tiny-llava-vtbench,policy={FASTV},device=cpu,report={report}"
    results = _simple_evaluate(task, args, batch_size)
    scores = results["results"]["vtdsl_data"]
    fastv = task["reference"]["fastv"]
    assert 0 < fastv["exact"] < 1  # the comparison would be empty at 0 or 1
    assert scores["exact,none"] == pytest.approx(fastv["exact"], abs=1e-12)
    assert scores["contains,none"] == pytest.approx(fastv["contains"], abs=1e-12)
    assert results["config"]["model_args"] == args
    extra = results["throughput"]
    # FastV keeps the top 50 % of the image tokens from LLM layer 2 on
    assert extra["avg_vtdsl_kept_llm_layer2_0"] == IMAGE_TOKENS // 2
    # eval --data costs the mean prompt, lmms-eval averages each example's ratio: the
    # prompts differ by a few text tokens, so the two agree to well under 0.1 %
    assert extra["avg_vtdsl_flops_ratio"] == pytest.approx(fastv["flops_ratio"], rel=1e-3)
    assert extra["avg_vtdsl_flops_ratio"] < 0.9
    written = json.loads(report.read_text())["generate_until"]
    assert written["policy_text"] == FASTV.read_text() and written["policy"] == "fastv"
    assert written["examples"] == N and written["kept_llm_layer2_0"] == IMAGE_TOKENS // 2
    assert written["flops_ratio"] == extra["avg_vtdsl_flops_ratio"]


def test_unpruned_without_a_policy(task):
    results = _simple_evaluate(task, "pretrained=tiny-llava-vtbench,device=cpu", 2)
    unpruned = task["reference"]["unpruned"]
    assert results["results"]["vtdsl_data"]["exact,none"] == pytest.approx(unpruned["exact"], abs=1e-12)
    assert results["throughput"]["avg_vtdsl_flops_ratio"] == 1.0
    assert results["throughput"]["avg_vtdsl_visual_tokens_to_llm"] == IMAGE_TOKENS


def _instances(kind: str, docs: list[dict], args_of) -> list:
    from lmms_eval.api.instance import Instance

    return [Instance(request_type=kind, arguments=args_of(i, doc), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, doc in enumerate(docs)]


def test_loglikelihood_scores_what_generate_scores(task):
    """`loglikelihood` against the compiled `generate` left to itself (greedy, KV cache):
    for the reference answer (one token) its log-probability is the log-softmax of the
    first step's logits and `is_greedy` whether that step's argmax is it; for the three
    tokens greedy decoding emits, the sum of the three steps' log-probabilities, greedy."""
    import torch

    from vtdsl.eval.data import encode, open_image, read_jsonl
    from vtdsl.eval.lmms import VtdslModel

    model = VtdslModel(pretrained="tiny-llava-vtbench", policy=str(FASTV), device="cpu")
    examples = read_jsonl(task["data"])[:6]
    docs = [{"image": ex.image_path, "question": ex.question} for ex in examples]
    model.task_dict = {"t": {"test": docs}}
    tokenizer = model.loaded.processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answer_ref, greedy_ref, answers, greedy = [], [], [], []
    for ex in examples:
        inputs = encode(model.loaded.processor, [open_image(ex.image_path)], [ex.question])
        with torch.inference_mode():
            out = model.loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                              return_dict_in_generate=True, pad_token_id=pad)
        steps = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
        token = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"][-1]
        answer_ref.append((float(steps[0][token]), int(steps[0].argmax()) == token))
        answers.append(" " + tokenizer.decode([token]).strip())
        emitted = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        greedy_ref.append(sum(float(step[t]) for step, t in zip(steps, emitted)))
        greedy.append(" " + tokenizer.decode(emitted))

    def visual(doc):
        return [open_image(doc["image"])]

    def ask(continuations):
        return model.loglikelihood(_instances("loglikelihood", docs, lambda i, doc: (
            doc["question"], continuations[i], visual, i, "t", "test")))

    got = ask(answers)
    assert [g for _, g in got] == [r for _, r in answer_ref]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in answer_ref], abs=1e-4)
    assert any(g for _, g in got) and all(v < 0 for v, _ in got)
    assert model.summary["loglikelihood"]["kept_llm_layer2_0"] == IMAGE_TOKENS // 2
    got = ask(greedy)
    assert all(g for _, g in got)
    assert [v for v, _ in got] == pytest.approx(greedy_ref, abs=1e-4)


def test_one_image_per_question_is_required(task):
    from vtdsl.eval.lmms import VtdslModel

    model = VtdslModel(pretrained="tiny-llava-vtbench", device="cpu")
    model.task_dict = {"t": {"test": [{"question": "q"}]}}
    requests = _instances("generate_until", [{}], lambda i, doc: ("q", {}, lambda d: [], 0, "t", "test"))
    with pytest.raises(ValueError, match="doc 0 gives 0 visuals; vtdsl models answer about exactly one image"):
        model.generate_until(requests)


def test_bad_model_args_say_what_is_wrong(tmp_path):
    from vtdsl.eval.lmms import VtdslModel
    from vtdsl.lang.errors import PolicyError

    bad = tmp_path / "bad.vt"
    bad.write_text('policy "bad"\nat llm.layer2 keep text top 500%\n')
    with pytest.raises(PolicyError, match=re.escape(f"{bad}:2:29: error: a percentage must lie in 0..100, got 500%")):
        VtdslModel(policy=str(bad), device="cpu")
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, not 'auto'"):
        VtdslModel(batch_size="auto")


def test_lmms_eval_finds_the_model_and_only_its_module_imports_lmms_eval():
    from lmms_eval.models import get_model

    from vtdsl.eval.lmms import VtdslModel

    assert get_model("vtdsl") is VtdslModel
    graph = import_graph()
    importers = sorted(m for m, target in graph.edges if target == "lmms_eval")
    assert importers == ["vtdsl.eval.lmms"]
    assert not [m for m, target in graph.edges if target == "vtdsl.eval.lmms"]
