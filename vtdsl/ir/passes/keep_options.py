"""The options of a `keep` stage's terms that need more than a count: `far`'s pivots.
(What happens to the rest is resolved by its option, vtdsl/ops/rest/.)"""

from __future__ import annotations

from ...lang import ast
from ..graph import iter_score_refs
from .common import error, qty_text, ref_text, resolve_score
from .stage_kinds import StageInput


def resolve_far(s: StageInput, term: ast.SelectTerm, kept: int, adaptive_seen: bool, asked: int) -> dict | None:
    """`far q [with N text pivots by s]`: the pivots are the `kept` tokens of the earlier
    terms plus N text tokens; each takes q // pivots tokens (so q is rounded down to a
    multiple of the pivots)."""
    graph, site, region = s.graph, s.site, s.action.region
    text = term.text_pivots or 0
    if term.normed and site.tower != "llm":
        error(graph, f"far(norm) compares hidden states after the LLM's final norm; {site.text()} is in the vision "
              "tower", term.span, expected="'far' without (norm) in the vision tower", code="scorer-site")
        return None
    if text and site.tower != "llm":
        error(graph, f"text pivots are text tokens, which exist only inside the LLM (not at {site.text()})",
              term.pivot_score.span, expected="'far' without text pivots in the vision tower", code="scorer-site")
        return None
    if adaptive_seen:
        error(graph, "'far' takes its pivots from the tokens kept before it, whose count varies per image here",
              term.span, expected="a fixed count before 'far'", code="adaptive")
        return None
    if region is not None:
        error(graph, "'far' compares every token with every pivot; it cannot also be split over regions",
              region.span, expected="the stage without 'per ...'", code="region")
        return None
    pivots = kept + text
    if pivots == 0:
        error(graph, "'far' keeps the tokens least similar to its pivots, but there are none: no term before it "
              "keeps a token and it names no text pivots", term.span,
              expected="a term before it (knorm top 4 + far 64) or 'far 64 with 4 text pivots by knorm'",
              code="quantity")
        return None
    per = asked // pivots
    if per == 0:
        error(graph, f"'far {qty_text(term.qty)}' shares {asked} tokens among {pivots} pivots: none for each",
              term.qty.span, expected=f"at least {pivots} tokens", code="quantity")
        return None
    if _vit_pivot_score(s, term):
        return None
    score = resolve_score(graph, term.pivot_score, s.obs_by_ref) if term.pivot_score is not None else None
    return {"count": per * pivots, "per_pivot": per, "text_pivots": text, "pivot_score": score,
            "normed": term.normed}


def _vit_pivot_score(s: StageInput, term: ast.SelectTerm) -> bool:
    """Report (True) a ViT score ranking text pivots, which it does not score."""
    if term.pivot_score is None:
        return False
    for ref in iter_score_refs(term.pivot_score):
        obs = s.obs_by_ref.get(id(ref))
        if obs is not None and obs.tower == "vit":
            error(s.graph, f"text pivots are ranked among text tokens, which '{ref_text(ref)}' (a ViT score) "
                  "does not score", ref.span, expected="an LLM score such as knorm or text(all)",
                  code="scorer-site")
            return True
    return False
