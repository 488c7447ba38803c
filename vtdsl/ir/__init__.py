"""IR: a policy resolved and checked against one model.

    plan = vtdsl.ir.check(policy, "llava-1.5-7b")   # raises PolicyError if invalid
    plan.stages, plan.llm_visual, plan.diagnostics    # warnings stay on the plan

`lower` builds the graph, `PASSES` (vtdsl/ir/passes/, one module each) check and resolve it,
`to_plan` flattens the result.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from ..lang import ast
from ..lang.errors import PolicyError
from ..models.spec import ModelSpec
from .decode import resolve_decode
from .graph import lower, stream
from .passes import (PASSES, RULES, expand_repeats, has_errors, infer_tokens, resolve_quantity, resolve_sites,
                     run_passes, validate)
from .plan import DecodeSelection, Observation, Plan, ResolvedAdaptive, ResolvedScore, ResolvedSite, ResolvedStage, ResolvedTerm

__all__ = [
    "check",
    "build_graph",
    "lower",
    "to_plan",
    "PASSES",
    "RULES",
    "resolve_sites",
    "validate",
    "infer_tokens",
    "resolve_quantity",
    "Plan",
    "DecodeSelection",
    "ResolvedAdaptive",
    "ResolvedStage",
    "ResolvedTerm",
    "ResolvedScore",
    "ResolvedSite",
    "Observation",
]


def _load_spec(model: ModelSpec | str) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    from ..models import get_spec

    return get_spec(model)


def build_graph(policy: ast.Policy, spec: ModelSpec) -> nx.DiGraph:
    """Unroll schedules, lower and run every pass; the returned graph carries all
    diagnostics (`policy` on the graph is the unrolled one)."""
    expanded, diagnostics = expand_repeats(policy, spec)
    graph = lower(expanded)
    graph.graph["diagnostics"].extend(diagnostics)
    if has_errors(graph):
        graph.graph["spec"] = spec
        return graph
    graph = run_passes(graph, PASSES, spec=spec)
    if policy.decode and not has_errors(graph):
        graph.graph["decode"] = resolve_decode(graph, policy, spec)
    if len(expanded.stages) != len(policy.stages) or diagnostics:
        # an unrolled schedule or range repeats one finding per layer at the same text:
        # report each once, and at most three per place
        seen: set = set()
        per_place: dict = {}
        unique = []
        for d in graph.graph["diagnostics"]:
            place = (d.span.line, d.span.column) if d.span else None
            key = (d.message, place, d.severity)
            if key in seen or per_place.get(place, 0) >= 3:
                continue
            seen.add(key)
            per_place[place] = per_place.get(place, 0) + 1
            unique.append(d)
        graph.graph["diagnostics"] = unique
    return graph


def to_plan(graph: nx.DiGraph) -> Plan:
    stages = [graph.nodes[node]["resolved"] for node in stream(graph)]
    return Plan(
        policy=graph.graph["policy"],
        spec=graph.graph["spec"],
        stages=stages,
        vit_tokens=list(graph.graph["vit_tokens"]),
        projector_tokens=graph.graph["projector_tokens"],
        image_placeholders=graph.graph["image_placeholders"],
        llm_visual=list(graph.graph["llm_visual"]),
        diagnostics=[d for d in graph.graph["diagnostics"] if d.severity == "warning"],
        decode=list(graph.graph.get("decode", ())),
    )


def check(
    policy: ast.Policy | str | Path,
    model: ModelSpec | str,
    *,
    source: str | None = None,
    filename: str = "<policy>",
) -> Plan:
    """Resolve and check `policy` against `model`; raise `PolicyError` on any error.

    `policy` may be an AST, a path to a `.vt`/`.yaml` file, or policy source text.
    `source`/`filename` (for an AST) let diagnostics quote the offending line.
    """
    from ..lang.source import load_policy

    if not isinstance(policy, ast.Policy):
        policy, source, filename = load_policy(policy, filename)
    spec = _load_spec(model)
    graph = build_graph(policy, spec)
    if has_errors(graph):
        errors = [d for d in graph.graph["diagnostics"] if d.severity == "error"]
        raise PolicyError(errors, source=source, filename=filename)
    return to_plan(graph)
