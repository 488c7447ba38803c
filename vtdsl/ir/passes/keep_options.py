"""The options of a `keep` stage that need more than a count: `far`'s pivots, and what
happens to the rest (`REST_OPTIONS`: `merge rest ... [by keys]`, `recycle`, `absorb`,
`recycle rest into cells`).

A rest option is a function `(StageInput, terms so far, kept) -> (tokens the rest becomes,
ResolvedStage fields) | None` (None: reported), listed once in `REST_OPTIONS` under the
`ast.Keep` field that holds it; a keep takes at most one (the AST checks that).
"""

from __future__ import annotations

from ...lang import ast
from ...lang.scorers import by_canonical
from ..graph import iter_score_refs
from ..plan import ResolvedTerm
from .common import error, qty_text, ref_text, resolve_quantity, resolve_score
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


def _first_term_unscored(graph, action: ast.Keep, terms: list, uses: str, example: str, code: str) -> bool:
    """Report (True) when the option needing the first term's score has none to read:
    `uses` says what it does with the score, `example` a stage that works."""
    if terms and terms[0].score is not None:
        return False
    first = next((t for t in action.terms if not isinstance(t, ast.ClsTokenTerm)), action.terms[0])
    error(graph, f"{uses} the first term's score, but the first term ('{first.kind}') has no score", first.span,
          expected=f"a scored first term, such as '{example}'", code=code)
    return True


def rest_merge(s: StageInput, terms: list[ResolvedTerm], kept: int) -> tuple[int, dict] | None:
    """`then merge (add) rest into N [by keys]`: N contextual tokens from what the terms
    surely leave over (a percent: of the tokens entering)."""
    action: ast.Keep = s.action
    leftover = s.fewest - kept
    rest = resolve_quantity(action.merge_rest, s.tokens_in)
    if rest > leftover:
        error(
            s.graph,
            f"'merge rest into {qty_text(action.merge_rest)}' asks for {rest} contextual tokens, but only "
            f"{leftover} tokens are left to merge",
            action.merge_rest.span,
            expected=f"at most {leftover} contextual tokens",
            code="quantity",
        )
        return None
    merge_keys = None
    if action.merge_by == "keys":
        merge_keys = _merge_keys(s.graph, action, terms, s.site)
        if merge_keys is None:
            return None
    return rest, {"merge_rest": rest, "merge_added": action.merge_added, "merge_keys": merge_keys}


def _merge_keys(graph, action: ast.Keep, terms: list, site) -> int | None:
    """`... by keys`: the ViT layer whose keys the first term's score read (VisionZip
    matches on the keys of the layer its CLS attention comes from)."""
    where = action.merge_rest.span
    if site.tower != "vit":
        error(graph, "'by keys' matches on a ViT layer's attention keys; this stage is in the LLM", where,
              expected="'then merge rest into N' without 'by keys'", code="merge-keys")
        return None
    score = terms[0].score if terms else None
    obs = score.observation if score is not None and score.op == "leaf" else None
    if obs is None or obs.tower != "vit" or not by_canonical(obs.scorer).keys_match:
        error(graph, "'by keys' takes the keys of the layer the first term's score reads, so the first term must "
              "be one ViT attention score", where,
              expected="a first term such as 'cls top 161' (keys of the layer its attention comes from)",
              code="merge-keys")
        return None
    return obs.layer


def _band_sizes(length: int, parts: int) -> list[int]:
    """How many of `length` grid rows (columns) fall in each of `parts` bands, by the
    `per region` rule: row r is in band floor(r * parts / length)."""
    sizes = [0] * parts
    for r in range(length):
        sizes[r * parts // length] += 1
    return sizes


def rest_cells(s: StageInput, terms: list[ResolvedTerm], kept: int) -> tuple[int, dict] | None:
    """`then recycle rest into RxC cells`: the full token grid cut as `per region RxC`;
    every cell must keep a dropped token whatever the terms keep, so it has more tokens
    than they keep in all. One token per cell."""
    graph, action, grid = s.graph, s.action, s.grid
    cells = action.cells
    if _first_term_unscored(graph, action, terms, "'recycle rest into cells' weights the dropped tokens by",
                            "cls top 64 then recycle rest into 2x2 cells", "recycle"):
        return None
    if grid is None:
        error(graph, f"'recycle rest into {cells.rows}x{cells.cols} cells' needs the full token grid, but an earlier "
              "stage already pruned or merged it (or the model's visual tokens form no grid here)", cells.span,
              expected="cells in the first stage that cuts the grid", code="pool-grid")
        return None
    if cells.rows > grid[0] or cells.cols > grid[1]:
        error(graph, f"'{cells.rows}x{cells.cols} cells' split a {grid[0]}x{grid[1]} token grid into empty cells",
              cells.span, expected=f"at most {grid[0]}x{grid[1]} cells", code="region")
        return None
    smallest = min(_band_sizes(grid[0], cells.rows)) * min(_band_sizes(grid[1], cells.cols))
    if smallest <= kept:
        error(graph, f"a {cells.rows}x{cells.cols} cell can hold as few as {smallest} tokens, which the terms (keeping "
              f"{kept}) could all keep, leaving the cell nothing to recycle", cells.span,
              expected=f"cells of more than {kept} tokens (fewer, larger cells)", code="recycle")
        return None
    return cells.rows * cells.cols, {"cells": (cells.rows, cells.cols)}


def rest_absorb(s: StageInput, terms: list[ResolvedTerm], kept: int) -> tuple[int, dict] | None:
    """`then absorb K`: K of the others (a percent: of them) among the fewest tokens
    entering; the first term's score weights what is absorbed, and something must be
    dropped. The dropped ones, so weighted, become one token."""
    graph, action, tokens_in = s.graph, s.action, s.fewest
    if _first_term_unscored(graph, action, terms, "'absorb' weights what each kept token takes in by",
                            "cls top 32 then absorb 32", "absorb"):
        return None
    if kept >= tokens_in:
        error(graph, f"'absorb' needs dropped tokens, but the terms keep all {tokens_in}", action.absorb.span,
              expected=f"terms keeping fewer than {tokens_in} tokens", code="absorb")
        return None
    k = resolve_quantity(action.absorb, tokens_in - 1)
    if not 1 <= k <= tokens_in - 1:
        error(graph, f"'absorb {qty_text(action.absorb)}' asks each kept token for {k} neighbours among the "
              f"{tokens_in - 1} others", action.absorb.span, expected=f"between 1 and {tokens_in - 1}",
              code="quantity")
        return None
    return 1, {"absorb": k}


def rest_recycle(s: StageInput, terms: list[ResolvedTerm], kept: int) -> tuple[int, dict] | None:
    """`then recycle N into M`: N of the tokens the stage surely drops (a percent: of
    them), M clusters (a percent: of the N); the first term's score ranks the dropped
    tokens. The M clusters are kept."""
    graph, action, dropped = s.graph, s.action, s.fewest - kept
    rec = action.recycle
    if rec.count.percent and any(t.adaptive is not None for t in terms):
        error(graph, f"'recycle {qty_text(rec.count)}' is a share of the tokens this stage drops, whose "
              "count varies per image after the adaptive count before it", rec.count.span,
              expected="a number of tokens", code="adaptive")
        return None
    if _first_term_unscored(graph, action, terms, "'recycle' ranks the dropped tokens by",
                            "text(all) top 300 then recycle 83 into 9", "recycle"):
        return None
    m = resolve_quantity(rec.count, dropped)
    if not 1 <= m <= dropped:
        error(graph, f"'recycle {qty_text(rec.count)}' asks for {m} of the {dropped} tokens this stage drops",
              rec.count.span, expected=f"between 1 and {dropped} tokens" if dropped else "a stage that drops tokens",
              code="quantity")
        return None
    c = resolve_quantity(rec.clusters, m)
    if not 1 <= c <= m:
        error(graph, f"'into {qty_text(rec.clusters)}' asks for {c} clusters of {m} recycled tokens",
              rec.clusters.span, expected=f"between 1 and {m} clusters", code="quantity")
        return None
    return c, {"recycle": (m, c)}


# ast.Keep field -> its resolver; adding a way to treat the rest is a function and a line here
REST_OPTIONS = {"merge_rest": rest_merge, "recycle": rest_recycle, "absorb": rest_absorb, "cells": rest_cells}
