"""Lowering: AST -> networkx graph of the token stream.

The graph is a DiGraph whose main path is the visual-token stream in execution order:

    source -> stage:0 -> stage:1 -> ... -> sink

Each stage node holds its AST action; each score a stage reads becomes an `observe`
node (one per distinct observation) with an edge into the stage that uses it. Later
passes annotate nodes (resolved sites, counts) and stream edges (`tokens`).

Node attributes (all nodes): `kind` in {"source", "stage", "select", "merge", "drop",
"observe", "sink"}; action nodes carry `index` (their stage).
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
    """Build the stream graph of a policy. Needs no model: resolution comes later.

    Each stage becomes a `stage` node (the site) followed by its action nodes on the
    stream: `select` (the keep terms), `merge` (`merge rest into`, ToMe `merge`, `pool`)
    or `drop`. Observations feed the `select` node of the stage that reads them.
    """
    graph = nx.DiGraph(policy=policy, diagnostics=[])
    graph.add_node(SOURCE, kind="source")
    previous = SOURCE

    def chain(node: str, **attrs) -> None:
        nonlocal previous
        graph.add_node(node, **attrs)
        graph.add_edge(previous, node, stream=True)
        previous = node

    for index, stage in enumerate(policy.stages):
        action = stage.action
        chain(stage_node(index), kind="stage", index=index, stage=stage, span=stage.span)
        if isinstance(action, ast.Keep):
            select = f"select:{index}"
            chain(select, kind="select", index=index, terms=action.terms, region=action.region, span=action.span)
            for term_index, term in enumerate(action.terms):
                refs = []
                if isinstance(term, ast.TopTerm):
                    refs = iter_score_refs(term.score)
                    if term.adaptive is not None and term.adaptive.score is not None:
                        refs += iter_score_refs(term.adaptive.score)  # read by the count rule
                elif isinstance(term, ast.SelectTerm) and term.pivot_score is not None:
                    refs = iter_score_refs(term.pivot_score)  # ranks the text pivots
                if refs:
                    for ref_index, ref in enumerate(refs):
                        obs = f"observe:{index}.{term_index}.{ref_index}"
                        graph.add_node(obs, kind="observe", score=ref, span=ref.span, stage_index=index)
                        graph.add_edge(obs, select, stream=False, term=term_index)
            if action.rest is not None:  # what happens to the rest: mode is its option's kind
                chain(f"merge:{index}", kind="merge", index=index, mode=action.rest.kind, span=action.rest.span)
        elif isinstance(action, ast.Merge):
            chain(f"merge:{index}", kind="merge", index=index, mode="static" if action.static else "tome",
                  span=action.span)
        elif isinstance(action, ast.Pool):
            chain(f"merge:{index}", kind="merge", index=index, mode="pool", span=action.span)
        else:
            chain(f"drop:{index}", kind="drop", index=index, span=action.span)
    graph.add_node(SINK, kind="sink")
    graph.add_edge(previous, SINK, stream=True)
    return graph


def stream_nodes(graph: nx.DiGraph) -> list[str]:
    """Every node on the token stream, source and sink included, in order."""
    order, node = [SOURCE], SOURCE
    while node != SINK:
        node = next(n for n in graph.successors(node) if graph.edges[node, n].get("stream"))
        order.append(node)
    return order


def observations_of(graph: nx.DiGraph, index: int) -> list[str]:
    """The observe nodes read by stage `index`, in source order."""
    return sorted(n for n, d in graph.nodes(data=True) if d["kind"] == "observe" and d["stage_index"] == index)


def stream(graph: nx.DiGraph) -> list[str]:
    """The stage nodes in stream order."""
    return [n for n in stream_nodes(graph) if graph.nodes[n]["kind"] == "stage"]
