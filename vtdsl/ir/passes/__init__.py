"""IR passes, one module per pass. Each pass is a pure function `graph -> graph` (the
input is never mutated).

`PASSES` lists them once, in order; `run_passes` fills each pass's keyword arguments from
its signature (sqlglot-style), so adding a pass means adding a module and its function
here. Every finding is a located `Diagnostic` appended to `graph.graph["diagnostics"]`;
the driver stops after a pass that reported an error, since later passes need its results.

`expand_repeats` is no graph pass: it rewrites the policy before lowering.
"""

from __future__ import annotations

import inspect

import networkx as nx

from .common import has_errors, resolve_quantity
from .expand_repeats import expand_repeats
from .infer_tokens import infer_tokens
from .resolve_sites import resolve_sites
from .validate import validate

PASSES = (resolve_sites, validate, infer_tokens)
RULES = PASSES  # the sqlglot name, which tests and callers use

__all__ = ["PASSES", "RULES", "expand_repeats", "has_errors", "infer_tokens", "resolve_quantity", "resolve_sites",
           "run_passes", "validate"]


def run_passes(graph: nx.DiGraph, rules=PASSES, **context) -> nx.DiGraph:
    """Apply `rules` in order, each getting the keyword arguments its signature names."""
    for rule in rules:
        wanted = inspect.signature(rule).parameters
        kwargs = {name: context[name] for name in wanted if name in context}
        graph = rule(graph, **kwargs)
        if has_errors(graph):
            break
    return graph
