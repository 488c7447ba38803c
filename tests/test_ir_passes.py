"""Golden fixtures for the IR passes: tests/fixtures/passes/<pass>/<case>.vt + .expected.

Each case runs the passes up to and including <pass> against the model named in its
`model "..."` line (or a `# check-against: NAME` comment), optionally with spec fields
overridden by `# spec: field=value` comments, and compares a rendering of the result
(diagnostics first, then the pass's own view) with the hand-written `.expected` file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vtdsl.ir import RULES, lower
from vtdsl.ir.graph import observations_of, stream
from vtdsl.ir.passes import run_passes
from vtdsl.lang import parse
from vtdsl.models import get_spec

FIXTURES = Path(__file__).parent / "fixtures" / "passes"
PASS_NAMES = [rule.__name__ for rule in RULES]
CASES = sorted(FIXTURES.glob("*/*.vt"))


def _spec_for(source: str, policy):
    name, overrides = policy.model, {}
    for line in source.splitlines():
        if line.startswith("# check-against:"):
            name = line.split(":", 1)[1].strip()
        if line.startswith("# spec:"):
            key, value = line.split(":", 1)[1].strip().split("=")
            overrides[key] = {"true": True, "false": False}.get(value, value)
            if key == "vision_feature_layer":
                overrides[key] = int(value)
    return dataclasses.replace(get_spec(name), **overrides)


def _ref_text(ref) -> str:
    text = ref.name + (f"({', '.join(ref.args)})" if ref.args else "")
    return text + (f"@{ref.at.text()}" if ref.at else "")


def _runs(values: list[int]) -> str:
    runs: list[list[int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{v} x{n}" for v, n in runs)


def render(graph, pass_name: str, source: str, filename: str) -> str:
    lines = [d.format(source, filename) for d in graph.graph["diagnostics"]]
    if any(d.severity == "error" for d in graph.graph["diagnostics"]):
        return "\n".join(lines)
    if pass_name == "resolve_sites":
        for node in stream(graph):
            data = graph.nodes[node]
            lines.append(f"stage {data['index']}: {data['stage'].site.text()} -> {data['site'].text()}")
            for obs_node in observations_of(graph, data["index"]):
                obs_data = graph.nodes[obs_node]
                obs = obs_data["observation"]
                lines.append(
                    f"  {_ref_text(obs_data['score'])} -> {obs.scorer}[{obs.queries}] at {obs.tower}.layer{obs.layer}"
                    + (" (on its input)" if obs.on_input else "")
                )
    elif pass_name == "infer_tokens":
        for node in stream(graph):
            stage = graph.nodes[node]["resolved"]
            parts = [f"{t.kind} {t.count}" for t in stage.terms]
            if stage.action == "keep" and stage.rest is not None and stage.rest.tokens:
                parts.append(f"rest {stage.rest.tokens}")
            if stage.action == "merge":
                parts.append(f"merge {stage.merge_rest}")
            if stage.action == "pool":
                parts.append(f"pool {stage.pool[0]}x{stage.pool[1]}")
            if stage.action == "drop":
                parts.append("drop")
            lines.append(
                f"stage {stage.index} {stage.site.text()}: {stage.tokens_in} -> {stage.tokens_out} [{', '.join(parts)}]"
            )
        lines.append(f"vit: {_runs(graph.graph['vit_tokens'])}")
        lines.append(f"projector: {graph.graph['projector_tokens']}")
        lines.append(f"llm: {_runs(graph.graph['llm_visual'])}")
    return "\n".join(lines)


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_pass_fixture(case: Path):
    pass_name = case.parent.name
    assert pass_name in PASS_NAMES, f"fixture folder {pass_name} names no pass"
    source = case.read_text()
    policy = parse(source, filename=case.name)
    spec = _spec_for(source, policy)
    rules = RULES[: PASS_NAMES.index(pass_name) + 1]
    graph = run_passes(lower(policy), rules=rules, spec=spec)
    expected = case.with_suffix(".expected").read_text().rstrip("\n")
    assert render(graph, pass_name, source, case.name) == expected


def test_every_pass_has_fixtures():
    for name in PASS_NAMES:
        assert list((FIXTURES / name).glob("*.vt")), f"no fixtures for pass {name}"


def test_passes_do_not_mutate_their_input():
    policy = parse('model "llava-1.5-7b"\nat llm.layer2 keep text top 50%')
    spec = get_spec("llava-1.5-7b")
    graph = lower(policy)
    before = {n: dict(d) for n, d in graph.nodes(data=True)}
    for rule in RULES:
        new = rule(graph, spec=spec)
        assert {n: dict(d) for n, d in graph.nodes(data=True)} == before
        assert graph.graph["diagnostics"] == []
        graph, before = new, {n: dict(d) for n, d in new.nodes(data=True)}


@pytest.mark.parametrize("fields, to_llm", [({}, 576), ({"spatial_merge": 2}, 24 * 24 // 4),
                                            ({"vit_crops": 5}, 5 * 576)])
def test_unpruned_counts_follow_patch_merge_and_crops(fields, to_llm):
    """tiny-llava's 24x24 patch grid; a 2x2 patch merger (Qwen2.5-VL) or 5 crops (LLaVA-NeXT
    anyres) change what reaches the LLM without any special case in the passes."""
    from vtdsl.cost import estimate
    from vtdsl.ir import check

    spec = dataclasses.replace(get_spec("tiny-llava"), **fields)
    plan = check(parse(""), spec)
    assert plan.projector_tokens == to_llm and spec.image_tokens == to_llm
    assert estimate(plan).flops_ratio == 1.0
