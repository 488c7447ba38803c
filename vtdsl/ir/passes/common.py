"""What every pass shares: reporting a finding, copying the graph, resolving a site,
a quantity or a score, and quoting a score or quantity back to the user."""

from __future__ import annotations

import math
from fractions import Fraction

import networkx as nx

from ...lang import ast
from ...lang.errors import Diagnostic
from ...models.spec import ModelSpec
from ..plan import ResolvedScore, ResolvedSite

TOWER_NAMES = {"vit": "ViT", "llm": "LLM"}


def error(graph: nx.DiGraph, message: str, span, **kw) -> None:
    graph.graph["diagnostics"].append(Diagnostic(message, span, **kw))


def warn(graph: nx.DiGraph, message: str, span, **kw) -> None:
    graph.graph["diagnostics"].append(Diagnostic(message, span, severity="warning", **kw))


def copy_graph(graph: nx.DiGraph) -> nx.DiGraph:
    new = graph.copy()
    new.graph["diagnostics"] = list(graph.graph["diagnostics"])
    return new


def has_errors(graph: nx.DiGraph) -> bool:
    return any(d.severity == "error" for d in graph.graph["diagnostics"])


def layer_count(spec: ModelSpec, tower: str) -> int:
    return spec.vit.layers if tower == "vit" else spec.llm.layers


def order_key(site: ResolvedSite, spec: ModelSpec, observed: bool = False) -> tuple:
    """Execution-order key. An observation at layer l happens inside l: after the token
    set entering l is fixed and before the stage entering l+1. `vit.out` comes after
    every ViT layer and before the LLM."""
    if site.tower == "vit" and site.layer is None:
        return (1, 0, 0)
    tower_rank = 0 if site.tower == "vit" else 2
    return (tower_rank, site.layer, 1 if observed else 0)


def resolve_site(graph, spec: ModelSpec, site: ast.Site, what: str) -> ResolvedSite | None:
    if site.index is None:
        return ResolvedSite("vit", None)
    count = layer_count(spec, site.tower)
    index = site.index + count if site.index < 0 else site.index
    if not 0 <= index < count:
        error(
            graph,
            f"{site.text()} is out of range: {spec.name}'s {TOWER_NAMES[site.tower]} has layers "
            f"0..{count - 1} (or -{count}..-1 from the end)",
            site.span,
            expected=f"a {site.tower} layer between 0 and {count - 1}",
            code="site-range",
        )
        return None
    return ResolvedSite(site.tower, index)


def ref_text(ref: ast.ScoreRef) -> str:
    text = ref.name + (f"({', '.join(ref.args)})" if ref.args else "")
    return text + (f"@{ref.at.text()}" if ref.at else "")


def resolve_quantity(qty: ast.Quantity, tokens_in: int) -> int:
    """A count as written, or `floor(n * p / 100 + 1/2)` computed exactly for a percent."""
    if not qty.percent:
        return int(qty.value)
    exact = Fraction(str(qty.value)) * tokens_in / 100 + Fraction(1, 2)
    return math.floor(exact)


def resolve_score(graph, score, obs_by_ref: dict) -> ResolvedScore:
    if isinstance(score, ast.ScoreRef):
        return ResolvedScore("leaf", obs_by_ref[id(score)])
    return ResolvedScore(score.op, args=tuple(resolve_score(graph, a, obs_by_ref) for a in score.args),
                         weights=tuple(score.weights) if score.weights is not None else None)


def qty_text(qty: ast.Quantity | None) -> str:
    if qty is None:
        return ""
    value = qty.value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value}%" if qty.percent else f"{value}"
