"""The `keep` stage kind: its terms in order, then what happens to the rest
(its option in vtdsl.ops.rest) and how the budget is split (`per ...`)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ...lang import ast
from ...ops import rest as rest_options
from ..plan import ResolvedAdaptive, ResolvedStage, ResolvedTerm
from .common import error, qty_text, resolve_quantity, resolve_score
from .keep_options import resolve_far
from .stage_kinds import StageInput, percent_of_varying, resolve_frames


@dataclass
class _Kept:
    """The terms resolved so far: `kept` the most tokens they can keep, `kept_min` the
    fewest (they differ after an adaptive count)."""

    terms: list[ResolvedTerm] = field(default_factory=list)
    kept: int = 0
    kept_min: int = 0
    adaptive_seen: bool = False
    ok: bool = True  # False once a term reported an error (the later ones are still checked)

    def add(self, term: ResolvedTerm, tokens_in: int) -> None:
        self.terms.append(term)
        self.kept = min(self.kept + term.count, tokens_in)  # no stage keeps more than enters
        self.kept_min += term.count if term.min_count is None else term.min_count


def infer_keep(s: StageInput):
    """The kept tokens are the terms' plus what the rest becomes (+ CLS); the grid
    survives only a stage that provably keeps every token as it was."""
    action: ast.Keep = s.action
    if percent_of_varying(s, _quantities(action)):
        return None
    picked = _resolve_terms(s)
    if not picked.ok:
        return None
    rest = None
    if action.rest is not None:
        rest = rest_options.by_node(action.rest).resolve(action.rest, _rest_context(s, picked))
        if rest is None:
            return None
    handed = rest.tokens if rest is not None else 0  # tokens the rest becomes, after the kept ones
    split = _resolve_region(s, picked)
    if split is None:
        return None
    region, proportional = split
    keep_cls = any(isinstance(t, ast.ClsTokenTerm) for t in action.terms)
    out, out_min = picked.kept + handed, picked.kept_min + handed
    stage_out = ResolvedStage(
        action="keep", tokens_out=out + keep_cls, terms=tuple(picked.terms), region=region, keep_cls=keep_cls,
        region_proportional=proportional, below=action.region.below if action.region is not None else None,
        region_softmax=action.region.softmax if action.region is not None else None,
        tokens_out_min=out_min + keep_cls if (out_min != out or s.varies) else None,
        rest=rest, **s.common()
    )
    exact = out == s.tokens_in and out_min == out and not s.varies
    return stage_out, (s.grid if exact and handed == 0 and not keep_cls else None)


def _quantities(action: ast.Keep) -> list:
    found = [t.qty for t in action.terms if getattr(t, "qty", None) is not None]
    if action.rest is not None:
        found += rest_options.by_node(action.rest).shares(action.rest)
    return found


def _rest_context(s: StageInput, picked: "_Kept") -> rest_options.RestContext:
    """What the rest option of the stage reads, and how it reports."""
    return rest_options.RestContext(
        action=s.action, terms=picked.terms, site=s.site, tokens_in=s.tokens_in, fewest=s.fewest, kept=picked.kept,
        adaptive=picked.adaptive_seen, grid=s.grid, report=functools.partial(error, s.graph),
        quantity=resolve_quantity, qty_text=qty_text)


def _resolve_terms(s: StageInput) -> _Kept:
    picked = _Kept()
    for term in s.action.terms:
        if isinstance(term, ast.ClsTokenTerm):
            continue  # one token ahead of the kept patches, outside the selection
        resolved = _resolve_term(s, term, picked)
        if resolved is None:
            picked.ok = False
            continue
        picked.add(resolved, s.tokens_in)
    return picked


def _resolve_term(s: StageInput, term, picked: _Kept) -> ResolvedTerm | None:
    available = s.fewest - picked.kept  # what is surely left for this term
    asked = _asked(s, term, picked, available)
    if asked is None:
        return None
    count, far = asked
    adaptive = term.adaptive if isinstance(term, ast.TopTerm) else None
    if adaptive is not None and adaptive.kind == "lof" and not _lof_fits(s, term, picked):
        return None
    sure = count
    if adaptive is not None and adaptive.kind in ("outliers", "lof"):
        count = min(count, s.tokens_in - picked.kept_min)  # at run time: at most what is there
        sure = min(count, 1) if adaptive.kind == "outliers" else 0  # only its sure tokens must fit
    if sure > available:
        qty_span = term.qty.span if term.qty is not None else term.span
        earlier = f" after the earlier terms kept {picked.kept}" if picked.kept else ""
        error(
            s.graph,
            f"'{term.kind if term.kind != 'top' else 'top'} {qty_text(term.qty)}' asks for {count} tokens, "
            f"but only {available} remain{earlier} ({s.entering()})",
            qty_span,
            expected=f"at most {available} tokens",
            code="quantity",
        )
        return None
    return _term(s, term, count, far, picked)


def _lof_fits(s: StageInput, term, picked: _Kept) -> bool:
    """`by lof` reads which tokens the earlier terms kept (its share masks or leaves them
    out), which the run time knows for `top` terms only; `lof(K, rest)` takes its share of
    the tokens kept before it, so it cannot come first."""
    if any(t.kind != "top" for t in picked.terms):
        error(s.graph, "'by lof' reads the tokens the earlier terms kept, which only 'top' terms tell before it",
              term.adaptive.span, expected="only '<score> top ...' terms before a 'by lof' term", code="adaptive")
        return False
    if term.adaptive.of_rest and not picked.terms:
        error(s.graph, "'by lof(K, rest)' takes its share of the tokens kept before it, and none are",
              term.adaptive.span, expected="an earlier term, or 'by lof(K)'", code="adaptive")
        return False
    return True


def _asked(s: StageInput, term, picked: _Kept, available: int) -> tuple[int, dict] | None:
    """The count a term asks for, and for `far` its pivots (None: reported)."""
    if isinstance(term, ast.BuffersTerm) and term.qty is None:
        if picked.adaptive_seen:
            error(s.graph, "'buffers' sizes itself by the tokens kept before it, whose count varies per image here",
                  term.span, expected="'buffers N' with a number, or no adaptive count before it", code="adaptive")
            return None
        return min(4 * picked.kept, available), {}
    count = resolve_quantity(term.qty, s.tokens_in)
    if not (isinstance(term, ast.SelectTerm) and term.kind == "far"):
        return count, {}
    far = resolve_far(s, term, picked.kept, picked.adaptive_seen, count)
    if far is None:
        return None
    return far["count"], far  # rounded down to a multiple of the pivots


def _term(s: StageInput, term, count: int, far: dict, picked: _Kept) -> ResolvedTerm:
    """The resolved term; an adaptive count (`top N by ...`) gives the most it can keep
    as `count` and the fewest as `min_count`."""
    adaptive = term.adaptive if isinstance(term, ast.TopTerm) else None
    score = resolve_score(s.graph, term.score, s.obs_by_ref) if isinstance(term, ast.TopTerm) else None
    seed = term.seed if isinstance(term, ast.SelectTerm) else None
    spread = term.spread if isinstance(term, ast.SelectTerm) else "min"
    resolved_adaptive, least = None, None
    if adaptive is not None:
        picked.adaptive_seen = True
        counted = resolve_score(s.graph, adaptive.score, s.obs_by_ref) if adaptive.score is not None else None
        resolved_adaptive = ResolvedAdaptive(adaptive.kind, count, adaptive.steps or 1, counted,
                                             adaptive.neighbours or 0, adaptive.of_rest)
        if adaptive.kind == "outliers":
            least = min(1, count)  # at least one token (the best), at most N
        elif adaptive.kind == "lof":
            least = 0  # RC keeps int(share * base) tokens, none when LOF finds no outlier
        else:  # entropy: never below N, at most every token still available
            least, count = count, s.tokens_in - picked.kept_min
    return ResolvedTerm(kind=term.kind, count=count, score=score, seed=seed, spread=spread, span=term.span,
                        adaptive=resolved_adaptive, min_count=least,
                        text_pivots=far.get("text_pivots", 0), pivot_score=far.get("pivot_score"),
                        per_pivot=far.get("per_pivot", 0), normed=far.get("normed", False))


def _resolve_region(s: StageInput, picked: _Kept) -> tuple[tuple | None, bool] | None:
    """`per crop | per region RxC [proportional] | per chunk N`: (the plan's region,
    proportional), or None when reported."""
    action: ast.Keep = s.action
    region = action.region
    if region is None:
        return None, False
    weighted = "proportional" if region.proportional else "softmax" if region.softmax is not None else None
    if weighted is not None and (not picked.terms or picked.terms[0].kind != "top"):
        first = next((t for t in action.terms if not isinstance(t, ast.ClsTokenTerm)), action.terms[0])
        error(s.graph, f"'{weighted}' shares the budget by each region's mean of the first term's score, "
              f"but the first term ('{first.kind}') has no score", first.span,
              expected="a scored first term, such as 'cls top 64 per region 4x4 proportional'", code="region")
        return None
    if picked.adaptive_seen:
        error(s.graph, "a count decided per image ('by ...') cannot also be split over regions", region.span,
              expected="the stage without 'per ...', or a fixed count", code="adaptive")
        return None
    if region.kind in ("frame", "window", "segment"):
        resolved = resolve_frames(s, region)
        return None if resolved is None else (resolved, region.proportional)
    if region.kind == "chunk":
        if region.chunks > s.fewest:
            error(s.graph, f"'per chunk {region.chunks}' cuts {s.fewest} tokens into empty chunks", region.span,
                  expected=f"at most {s.fewest} chunks", code="region")
            return None
        return ("chunk", region.chunks, 0), region.proportional
    grid = s.grid
    if region.kind == "region" and grid is not None and (region.rows > grid[0] or region.cols > grid[1]):
        error(
            s.graph,
            f"'per region {region.rows}x{region.cols}' splits a {grid[0]}x{grid[1]} token grid into empty regions",
            region.span,
            expected=f"at most {grid[0]}x{grid[1]} regions",
            code="region",
        )
        return None
    return (region.kind, region.rows or 0, region.cols or 0), region.proportional
