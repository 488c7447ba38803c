"""Decode-time KV selection (`during decode at llm.layerN attend top K`), resolved and
checked against a model after the prefill stages: the layer, the count and the visual
entries the cache holds there. Prefill counts are untouched (the cache is kept whole)."""

from __future__ import annotations

import networkx as nx

from ..lang import ast
from ..models.spec import ModelSpec
from .passes.common import error, resolve_quantity, resolve_site
from .plan import DecodeSelection


def resolve_decode(graph: nx.DiGraph, policy: ast.Policy, spec: ModelSpec) -> list[DecodeSelection]:
    """One `DecodeSelection` per decode stage; located errors on the graph otherwise."""
    out: list[DecodeSelection] = []
    layers = spec.llm.layers
    for i, sel in enumerate(policy.decode):
        if i:
            error(graph, "a policy has at most one decode stage", sel.span,
                  hint="one layer picks the visual entries; every later layer attends to the same ones",
                  code="semantic")
            continue
        if sel.site.tower != "llm":
            error(graph, f"a decode stage acts in the LLM's attention, not at {sel.site.text()}", sel.site.span,
                  expected="an LLM site such as llm.layer3", code="semantic")
            continue
        site = resolve_site(graph, spec, sel.site, "decode stage")
        if site is None:
            continue
        if site.layer == 0:
            error(graph, "a decode stage at llm.layer0 has no earlier layer whose attention picks the entries",
                  sel.site.span, expected="llm.layer1 or later (layer N-1's attention decides for N on)",
                  code="semantic")
            continue
        stages = graph.graph["policy"].stages  # schedules unrolled
        later = next((s for s in stages if s.site.tower == "llm"
                      and (s.site.index + layers if s.site.index < 0 else s.site.index) >= site.layer), None)
        if later is not None:
            # the selection ranks layer N-1's cache rows and masks the same rows in layers
            # N..; a cut from layer N on would leave those layers other rows
            error(graph, f"a decode stage at {sel.site.text()} needs every LLM prefill stage before that layer",
                  sel.span, hint=f"the stage at {later.site.text()} changes which entries the later layers' "
                                 f"caches hold; move it before {sel.site.text()} or the decode stage after it",
                  code="semantic")
            continue
        visual = graph.graph["llm_visual"][site.layer - 1]
        if sel.mass is not None:
            out.append(DecodeSelection(layer=site.layer, k=visual, visual=visual, mass=sel.mass,
                                       text=f"during decode at llm.layer{site.layer} attend top p {sel.mass:g}"))
            continue
        k = resolve_quantity(sel.qty, visual)
        if k > visual:
            error(graph, f"'attend top {k}' asks for more visual entries than the {visual} the cache holds "
                         f"at {sel.site.text()}", sel.qty.span,
                  expected=f"a count of at most {visual}, or a percentage", code="token-count")
            continue
        out.append(DecodeSelection(layer=site.layer, k=k, visual=visual, percent=sel.qty.percent,
                                   text=f"during decode at llm.layer{site.layer} attend top {k}"))
    return out
