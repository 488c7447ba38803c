"""Lowering: AST -> networkx graph of the token stream.

The graph is a DiGraph whose main path is the visual-token stream in execution order:

    source -> stage:0 -> stage:1 -> ... -> sink

Each stage node holds its AST action; each score a stage reads becomes an `observe`
node (one per distinct observation) with an edge into the stage that uses it. Later
passes annotate nodes (resolved sites, counts) and stream edges (`tokens`).

Node attributes (all nodes): `kind` in {"source", "stage", "observe", "sink"}.
Stage nodes: `index`, `stage` (AST Stage), `span`; after `resolve_sites`: `site`
(ResolvedSite), `order` (execution-order key); after `infer_tokens`: `tokens_in`,
`tokens_out`, `terms`, ...
Observe nodes: `score` (AST ScoreRef), `span`; after `resolve_sites`: `observation`.
Graph attributes: `policy`, `diagnostics` (list), `spec` (after resolve).
"""

from __future__ import annotations

import networkx as nx

from ..lang import ast

SOURCE, SINK = "source", "sink"


def stage_node(index: int) -> str:
    return f"stage:{index}"


def iter_score_refs(score) -> list[ast.ScoreRef]:
    if isinstance(score, ast.ScoreRef):
        return [score]
    return [ref for arg in score.args for ref in iter_score_refs(arg)]


def lower(policy: ast.Policy) -> nx.DiGraph:
    """Build the stream graph of a policy. Needs no model: resolution comes later."""
    graph = nx.DiGraph(policy=policy, diagnostics=[])
    graph.add_node(SOURCE, kind="source")
    previous = SOURCE
    for index, stage in enumerate(policy.stages):
        node = stage_node(index)
        graph.add_node(node, kind="stage", index=index, stage=stage, span=stage.span)
        graph.add_edge(previous, node, stream=True)
        previous = node
        if isinstance(stage.action, ast.Keep):
            for term_index, term in enumerate(stage.action.terms):
                if isinstance(term, ast.TopTerm):
                    for ref_index, ref in enumerate(iter_score_refs(term.score)):
                        obs = f"observe:{index}.{term_index}.{ref_index}"
                        graph.add_node(obs, kind="observe", score=ref, span=ref.span, stage_index=index)
                        graph.add_edge(obs, node, stream=False, term=term_index)
    graph.add_node(SINK, kind="sink")
    graph.add_edge(previous, SINK, stream=True)
    return graph


def stream(graph: nx.DiGraph) -> list[str]:
    """The stage nodes in stream order (source and sink excluded)."""
    order, node = [], SOURCE
    while True:
        successors = [n for n in graph.successors(node) if graph.edges[node, n].get("stream")]
        if not successors:
            return order
        node = successors[0]
        if node == SINK:
            return order
        order.append(node)
