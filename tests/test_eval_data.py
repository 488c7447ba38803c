"""A user's own data: the JSONL reader (bad lines located), exact and contains scoring,
`vtdsl eval --data` against the vtbench harness, and the search's accuracy on --data."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import vtdsl.compiler as vc
from vtdsl.cli import main
from vtdsl.eval.bench import generate
from vtdsl.eval.data import DataError, contains, exact_match, normalize, read_jsonl

HALF = 'policy "half"\nat vit.out keep cls top 72\n'


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_vtbench(directory, n: int, split: str = "val"):
    """`n` vtbench examples as a JSONL file with PNG images beside it; the examples."""
    (directory / "img").mkdir(parents=True, exist_ok=True)
    examples = generate(split, n)
    lines = []
    for i, ex in enumerate(examples):
        ex.image.save(directory / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "question": ex.question, "answer": ex.answer,
                                 "tag": ex.family}))
    path = directory / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, examples


def test_reader_resolves_images_answers_and_tags(tmp_path):
    path, examples = write_vtbench(tmp_path / "d", 2)
    extra = {"image": "img/0.png", "question": " What is it? ", "answers": ["A cat", "kitten"], "family": "pets"}
    path.write_text(path.read_text() + "\n" + json.dumps(extra) + "\n")
    got = read_jsonl(path)
    assert [e.line for e in got] == [1, 2, 4]  # the blank line 3 is skipped
    assert got[0].image_path == str(tmp_path / "d" / "img" / "0.png")
    assert got[0].answers == (examples[0].answer,) and got[0].tag == examples[0].family
    assert got[2].answers == ("A cat", "kitten") and got[2].tag == "pets" and got[2].question == "What is it?"
    untagged = tmp_path / "d" / "one.jsonl"
    untagged.write_text('{"image": "img/1.png", "question": "q", "answer": "a"}\n')
    assert read_jsonl(untagged)[0].tag == "untagged"


def test_bad_lines_are_reported_with_their_line_numbers(tmp_path):
    path, _ = write_vtbench(tmp_path, 1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    lines = [
        path.read_text().strip(),
        '{"image": "img/gone.png", "question": "q", "answer": "a"}',
        '{"image": "broken.png", "question": "q", "answer": "a"}',
        '{"image": "img/0.png", "question": "q"}',
        '{"image": "img/0.png", "question": "q", "answer": []}',
        '{"image": "img/0.png", "question": "q", "answer": "a"',
        '["not", "an", "object"]',
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(bad)
    assert [d.span.line for d in err.value.diagnostics] == [2, 3, 4, 5, 6, 7]
    result = run(["eval", tmp_path / "p.vt", "--data", bad])  # the policy is never read: data first
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert errors[0] == f"{bad}:2:11: error: image 'img/gone.png' not found"
    assert errors[1].startswith(f"{bad}:3:11: error: image 'broken.png' unreadable")
    assert errors[2] == f"{bad}:4:1: error: no answer"
    assert errors[3].startswith(f"{bad}:5:") and errors[3].endswith("error: no answer")
    assert errors[4].startswith(f"{bad}:6:") and "not valid JSON" in errors[4]
    assert errors[5] == f"{bad}:7:1: error: expected a JSON object"
    assert "Traceback" not in result.output


def test_exact_and_contains_scoring():
    assert normalize("  The  Blue, circle! ") == "the blue circle"
    assert normalize("top-left") == "top-left" and normalize("it's") == "it's"
    assert exact_match("Blue.", ["blue"]) and not exact_match("light blue", ["blue"])
    assert exact_match("kitten", ["cat", "Kitten"])
    assert contains("It is a red circle.", ["red circle"]) and not exact_match("It is a red circle.", ["red circle"])
    assert not contains("reddish", ["red"])  # whole words only
    assert contains("Two.", ["two", "2"]) and not contains("", ["a"])


def test_eval_data_scores_as_the_harness_does(tmp_path):
    from vtdsl.eval.harness import evaluate
    from vtdsl.models.vtbench import load_tiny_vtbench, vtbench_spec

    path, examples = write_vtbench(tmp_path, 20)
    policy = tmp_path / "half.vt"
    policy.write_text(HALF)
    result = run(["eval", policy, "--data", path, "--batch-size", 8, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["examples"] == 20 and data["max_new_tokens"] == 1 and data["model"] == "tiny-llava-vtbench"
    rows = {r["policy"]: r for r in data["results"]}
    assert list(rows) == ["unpruned", "half"]
    # the harness (first-token argmax, its own prompts and pixels) on the same examples
    model, processor = load_tiny_vtbench()
    spec = vtbench_spec()
    direct = {"unpruned": evaluate(model, examples, processor, batch_size=8, progress=False)}
    with vc.apply(HALF, model, spec=spec):
        direct["half"] = evaluate(model, examples, processor, batch_size=8, progress=False)
    for name, res in direct.items():
        assert rows[name]["exact"] == res["overall"]
        assert {t: v["exact"] for t, v in rows[name]["per_tag"].items()} == res["per_family"]
        assert {t: v["n"] for t, v in rows[name]["per_tag"].items()} == res["counts"]
    assert rows["half"]["visual_tokens_to_llm"] == 72 and rows["half"]["flops_ratio"] < 1.0
    assert rows["half"]["retention"] == rows["half"]["exact"] / rows["unpruned"]["exact"]
    text = run(["eval", policy, "--data", path, "--batch-size", 8, "--n", 10])
    assert text.exit_code == 0, text.output
    assert "eval 20/20 examples" in text.stderr  # one bar over both runs of the 10 examples
    assert text.stdout.splitlines()[1].split() == ["policy", "tokens", "FLOPs", "latency", "exact", "contains",
                                                   "retention", "color", "count", "exists", "locate", "read"]


def test_search_accuracy_objective_on_data(tmp_path):
    from vtdsl.eval.harness import evaluate
    from vtdsl.ir import check
    from vtdsl.lang.source import parse_text
    from vtdsl.models.vtbench import load_tiny_vtbench, vtbench_spec
    from vtdsl.search.objectives import DataAccuracy, ObjectiveUnavailable, make_objective

    path, examples = write_vtbench(tmp_path, 12)
    spec = vtbench_spec()
    objective = make_objective("accuracy", spec, examples=10, data=str(path))
    assert isinstance(objective, DataAccuracy)
    plan = check(parse_text(HALF), spec)
    scored = objective(plan)
    model, processor = load_tiny_vtbench()
    with vc.apply(plan, model, spec=spec):
        direct = evaluate(model, examples[:10], processor, progress=False)
    assert scored["score"] == direct["overall"] and scored["examples"] == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nope.png", "question": "q", "answer": "a"}\n')
    with pytest.raises(ObjectiveUnavailable, match="bad.jsonl:1:11: error: image 'nope.png' not found"):
        make_objective("accuracy", spec, data=str(bad)).setup()
    misuse = run(["search", "examples/design.vts", "--objective", "agreement", "--data", path])
    assert misuse.exit_code == 2 and "--data is for --objective accuracy" in misuse.output
