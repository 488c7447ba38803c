"""Per-forward state of a compiled model and the tower-independent stage executor.

Token identity
--------------
Every visual token carries two ids while it moves through the model:

- `vid`: its ViT origin (0 = CLS, 1 + r = patch r in raster order). Scores observed at
  one layer are aligned to the tokens of a later stage by `vid` (ViT) or by sequence
  position (LLM), so an observation may precede other stages.
- `gpos`: its raster position on `grid` (-1 off the grid, e.g. CLS), for `buffers` and
  `per region`. `pool` replaces the grid by the pooled one.

A token produced by merging takes the identity of its target (the token it was merged
into); a pooled token takes that of the top-left token of its window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from ..ops import frames as ops_frames
from ..ops.rest import MissingInput
from ..ir.plan import Observation, ResolvedScore, ResolvedStage


class CompileError(ValueError):
    """The policy cannot be compiled onto this model (or the model is already compiled)."""


@dataclass
class Tokens:
    """Identities of the selectable visual tokens of G images, aligned with ``[G, n, d]``."""

    vid: Tensor  # [G, n] int64
    gpos: Tensor  # [G, n] int64
    grid: tuple[int, int]
    # crops packed for the LLM (LLaVA-NeXT, `families.llava_next`): the crop each token came
    # from [G, n] (0 = base view), for `per crop`; None: one crop (every ViT row is one crop)
    crop: Tensor | None = None
    crops: int = 1

    @staticmethod
    def initial(g: int, grid: tuple[int, int], device, with_cls: bool) -> "Tokens":
        cells = grid[0] * grid[1]
        patches = torch.arange(cells, device=device)
        if with_cls:
            vid = torch.cat([patches.new_zeros(1), patches + 1])
            gpos = torch.cat([patches.new_full((1,), -1), patches])
        else:
            vid, gpos = patches + 1, patches
        return Tokens(vid[None].expand(g, -1), gpos[None].expand(g, -1), grid)

    @staticmethod
    def video(g: int, groups: int, grid: tuple[int, int], device, newline: bool = False) -> "Tokens":
        """A video's LLM tokens: its `groups` temporal groups one after another, each a
        `grid` in raster order; `crop` is each token's group (its frame), `gpos` its
        position in the frame, so `per frame` and temporal scores pair tokens across frames.
        A `newline` token after the last group (LLaVA-OneVision) counts with the last group,
        at the position past its grid (no other frame has a token there)."""
        cells = grid[0] * grid[1]
        idx = torch.arange(groups * cells + (1 if newline else 0), device=device)
        frame = (idx // cells).clamp(max=groups - 1)
        return Tokens((idx + 1)[None].expand(g, -1), (idx - frame * cells)[None].expand(g, -1), grid,
                      frame[None].expand(g, -1), groups)

    @property
    def count(self) -> int:
        return self.vid.shape[1]

    def take(self, idx: Tensor) -> "Tokens":
        crop = self.crop.gather(1, idx) if self.crop is not None else None
        return Tokens(self.vid.gather(1, idx), self.gpos.gather(1, idx), self.grid, crop, self.crops)

    def drop_first(self) -> "Tokens":
        crop = self.crop[:, 1:] if self.crop is not None else None
        return Tokens(self.vid[:, 1:], self.gpos[:, 1:], self.grid, crop, self.crops)

    def expand_to(self, g: int) -> "Tokens":
        """Repeat each image's ids when generate() expanded the batch (beams, samples)."""
        have = self.vid.shape[0]
        if have == g:
            return self
        if have == 0 or g % have:
            raise CompileError(f"visual token bookkeeping has {have} images but the batch needs {g}")
        r = g // have
        crop = self.crop.repeat_interleave(r, 0) if self.crop is not None else None
        return Tokens(self.vid.repeat_interleave(r, 0), self.gpos.repeat_interleave(r, 0), self.grid, crop,
                      self.crops)


@dataclass
class Scored:
    """Scores of one observation over the token set it was read from."""

    values: Tensor  # [G, n] (by vid) or [B, n] (by sequence position)
    ids: Tensor  # same shape: vid or sequence position of each column
    by: str  # "vid" | "pos"
    size: int  # id range (P + 1 for vid, prefill length for pos)


def _align(scored: Scored, ids: Tensor) -> Tensor:
    """Scores for the tokens `ids` (same kind of id, ``[R, n]``); NaN where unobserved."""
    values, src = scored.values.float(), scored.ids
    rows = ids.shape[0]
    if values.shape[0] != rows:
        if values.shape[0] == 0 or rows % values.shape[0]:
            raise CompileError(f"cannot align scores of {values.shape[0]} rows to {rows} rows")
        r = rows // values.shape[0]
        values, src = values.repeat_interleave(r, 0), src.repeat_interleave(r, 0)
    buf = torch.full((rows, scored.size), float("nan"), device=values.device)
    buf.scatter_(1, src, values)
    return buf.gather(1, ids)


@dataclass
class StageView:
    """What a stage sees: candidate tokens, their identities, and how to score them."""

    x: Tensor  # [G, n, d]
    tokens: Tokens
    score_of: Callable[[Observation], Tensor]  # -> [G, n] aligned float32
    # LLM stages: (score, m) -> ([G, m, d] features, [G, m] prompt positions) of the m
    # text tokens after the image that the score ranks highest, best first (`far ... with
    # m text pivots by score`)
    text_pivots: Callable[[ResolvedScore, int], tuple[Tensor, Tensor]] | None = None
    # ViT observations: their sum over the tokens they were read on ``[G, 1]`` (`share`
    # divides by it); None: `share` divides by the sum over the stage's candidates
    total_of: Callable[[Observation], Tensor | None] | None = None
    # LLM stages: the final norm's weight ``[d]`` (`far(norm)`: cosine is invariant to the
    # norm's per-token scale, so the normed states compare as x * weight)
    norm_weight: Tensor | None = None
    # ViT stages: a layer -> its attention keys, head mean, for the candidates ``[G, n, dh]``
    # (`then merge rest into N by keys`)
    keys_of: Callable[[int], Tensor] | None = None
    # LLM stages: the candidates' prompt positions ``[G, n]`` (`far` walks DART's set of
    # its pivots' positions)
    seq_pos: Tensor | None = None


def evaluate_score(score: ResolvedScore, view: StageView) -> Tensor:
    if score.op == "leaf":
        return view.score_of(score.observation)
    parts = torch.stack([evaluate_score(a, view) for a in score.args])
    if score.weights is not None:
        parts = parts * torch.tensor(score.weights, dtype=parts.dtype, device=parts.device).view(-1, *[1] * (parts.dim() - 1))
    if score.op == "mean":
        return parts.mean(0)
    if score.op == "sum":
        return parts.sum(0)
    if score.op == "share":
        arg = score.args[0]
        if arg.op == "leaf" and view.total_of is not None:
            # a ViT score: of the tokens it was read on (FlowCut normalises at each layer)
            total = view.total_of(arg.observation)
            if total is not None:
                weight = score.weights[0] if score.weights is not None else 1.0
                return parts[0] / (weight * total)
        return parts[0] / parts[0].nansum(-1, keepdim=True)  # of the stage's candidates (NaN: left out)
    if score.op == "prod":
        return parts.prod(0)
    return parts.amax(0)


def _adaptive_count(term, scores: Tensor, view: StageView, available: int, kept: Tensor | None) -> int:
    """This call's count of a `top N by ...` term (one for the whole batch: `ops.counts`);
    `kept`: ``[G, n]`` the tokens the earlier (`top`) terms keep, for `by lof`."""
    rule = term.adaptive
    if rule.kind == "outliers":
        return ops.outlier_count(scores, min(rule.bound, available))
    if rule.kind == "lof":
        return ops.lof_count(scores, kept, rule.neighbours, rule.of_rest, rule.bound)
    return ops.entropy_count(evaluate_score(rule.score, view), available, rule.bound, rule.steps)


def _survivors(assign: Tensor) -> Tensor:
    """Input tokens that survive `ops.merge.bipartite_merge` (A = even, B = odd).

    A slot holding several inputs holds one B token (the survivor) and the A tokens
    merged into it; a slot with one input holds a survivor.
    """
    b, n = assign.shape
    counts = torch.zeros(b, n, dtype=torch.long, device=assign.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign))
    even = (torch.arange(n, device=assign.device) % 2 == 0)[None]
    merged = (counts.gather(1, assign) > 1) & even
    return ~merged


def execute(stage: ResolvedStage, view: StageView,
            on_scores: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor, Tokens]:
    """Run one stage on ``[G, n, d]`` candidates.

    Returns ``(values [G, k, d], src [G, k], tokens)``: the output tokens, for each the
    input token whose identity it takes, and the new identities. Output order: kept
    tokens ascending, then contextual tokens (`merge rest`) in target order — the
    VisionZip layout; the LLM re-sorts by position. `on_scores` receives the scores
    ``[G, n]`` of the stage's first scored term (for pictures; None on the hot path).
    """
    _check_count(stage, view.x.shape[1])
    whole = _WHOLE_SET.get(stage.action)
    if whole is not None:
        return whole(stage, view)
    terms, needs_features = _terms(stage, view, on_scores)
    kept = _select(stage, view, terms, needs_features)
    return _rest(stage, view, kept, terms[0].scores if terms else None)


def _check_count(stage: ResolvedStage, n: int) -> None:
    if not stage.fewest_in <= n <= stage.tokens_in:
        expected = (f"{stage.tokens_in}" if stage.fewest_in == stage.tokens_in
                    else f"{stage.fewest_in} to {stage.tokens_in}")
        raise CompileError(f"stage at {stage.site.text()} expected {expected} visual tokens per image, got {n}")


# ------------------------------------------------------------- actions on the whole set
def _drop(stage: ResolvedStage, view: StageView) -> tuple[Tensor, Tensor, Tokens]:
    x = view.x
    src = torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
    return x[:, :0], src, view.tokens.take(src)


def _pool(stage: ResolvedStage, view: StageView) -> tuple[Tensor, Tensor, Tokens]:
    x, tokens = view.x, view.tokens
    g, device = x.shape[0], x.device
    kr, kc = stage.pool
    rows, cols = tokens.grid
    out = ops.pool2d(x, tokens.grid, kr, kc)
    prow, pcol = ops.pooled_grid(tokens.grid, kr, kc)
    r = torch.arange(prow, device=device) * min(kr, rows)
    c = torch.arange(pcol, device=device) * min(kc, cols)
    src = (r[:, None] * cols + c[None, :]).flatten()[None].expand(g, -1)
    new = Tokens(
        tokens.vid.gather(1, src),
        torch.arange(prow * pcol, device=device)[None].expand(g, -1),
        (prow, pcol),
    )
    return out, src, new


def _tome_merge(stage: ResolvedStage, view: StageView) -> tuple[Tensor, Tensor, Tokens]:
    x = view.x
    g, n, _ = x.shape
    out, _size, assign = ops.bipartite_merge(x, stage.merge_rest, return_assign=True)
    src = _survivors(assign).nonzero()[:, 1].view(g, n - stage.merge_rest)
    return out, src, view.tokens.take(src)


def _static_merge(stage: ResolvedStage, view: StageView) -> tuple[Tensor, Tensor, Tokens]:
    """`merge static`: DyCoke's TTM over the video's windows or segments (vtdsl.ops.frames)."""
    x, tokens = view.x, view.tokens
    if tokens.crop is None:
        raise CompileError(f"stage at {stage.site.text()}: 'merge static' on visual tokens without frames (an image)")
    kept = ops_frames.static_merge(x, tokens.crop, tokens.gpos, _frame_groups(stage, x, tokens), stage.merge_rest)
    return ops.gather_tokens(x, kept), kept, tokens.take(kept)


_WHOLE_SET = {"drop": _drop, "pool": _pool, "merge": _tome_merge, "static": _static_merge}


# ------------------------------------------------------------- keep: terms and selection
def _terms(stage: ResolvedStage, view: StageView,
           on_scores: Callable[[Tensor], None] | None) -> tuple[list[ops.TermSpec], bool]:
    """The stage's terms with this call's scores and counts, and whether any selection
    compares the candidates' features."""
    n = view.x.shape[1]
    terms = []
    needs_features = False
    taken = 0  # tokens the terms so far keep (this call's counts)
    # `by lof` reads which tokens the earlier terms keep (the IR allows only `top` terms there)
    kept = torch.zeros(view.x.shape[:2], dtype=torch.bool, device=view.x.device) if any(
        t.adaptive is not None and t.adaptive.kind == "lof" for t in stage.terms) else None
    for term in stage.terms:
        scores = evaluate_score(term.score, view) if term.score is not None else None
        if on_scores is not None and scores is not None:
            on_scores(scores)
            on_scores = None
        needs_features |= term.kind in ("diverse", "unique", "far")  # diverse(sum) too
        kind = "diverse_sum" if term.kind == "diverse" and term.spread == "sum" else term.kind
        count = term.count if term.adaptive is None else _adaptive_count(term, scores, view, n - taken, kept)
        taken += count
        if kept is not None and term.kind == "top":
            kept = kept.scatter(1, ops.topk(scores, count, exclude=kept), True)
        pivots, pivot_keys, feats = _far_inputs(stage, term, view)
        keys = view.seq_pos if term.kind == "far" else None
        terms.append(ops.TermSpec(kind=kind, count=count, scores=scores, seed=term.seed, per_pivot=term.per_pivot,
                                  pivots=pivots, features=feats, keys=keys, pivot_keys=pivot_keys))
    return terms, needs_features


def _far_inputs(stage: ResolvedStage, term,
                view: StageView) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`far`'s text pivots, their prompt positions and, for `far(norm)`, the features it
    compares."""
    pivots = pivot_keys = feats = None
    if term.text_pivots:
        if view.text_pivots is None:
            raise CompileError(f"stage at {stage.site.text()} has no text tokens for 'far' to take pivots from")
        pivots, pivot_keys = view.text_pivots(term.pivot_score, term.text_pivots)
    if term.normed:
        if view.norm_weight is None:
            raise CompileError(f"stage at {stage.site.text()}: far(norm) needs the LLM's final norm")
        weight = view.norm_weight.to(view.x.dtype)
        feats = view.x * weight
        pivots = None if pivots is None else pivots * weight
    return pivots, pivot_keys, feats


def _frame_groups(stage: ResolvedStage, x: Tensor, tokens: Tokens) -> Tensor:
    """``[G, F]``: each frame's window (`per window N`) or segment (`per segment C`)."""
    kind, size, _ = stage.region
    if kind == "window":
        return ops_frames.window_segments(x.shape[0], tokens.crops, size, x.device)
    return ops_frames.similar_segments(x, tokens.crop, tokens.crops, size, stage.below)


def _regions(stage: ResolvedStage, x: Tensor, tokens: Tokens) -> tuple[Tensor | None, int | None]:
    """`per region` / `per chunk` / `per crop` / `per frame` / `per window` / `per segment`:
    the region of each candidate, and how many."""
    g, n, device = x.shape[0], x.shape[1], x.device
    if stage.region is None:
        return None, None
    kind, rr, rc = stage.region
    if kind == "region":
        return ops.split_regions(tokens.gpos, tokens.grid, rr, rc), rr * rc
    if kind == "chunk":
        return ops.split_chunks(n, rr, device)[None].expand(g, -1), rr
    if kind in ("frame", "window", "segment") and tokens.crop is None:
        raise CompileError(f"stage at {stage.site.text()}: 'per {kind}' on visual tokens without frames (an image)")
    if kind in ("window", "segment"):
        seg = _frame_groups(stage, x, tokens)
        return seg.gather(1, tokens.crop), (seg.shape[1] if kind == "segment" else int(seg.max()) + 1)
    if tokens.crop is not None:  # crops packed for the LLM (a video's: its temporal groups): each its share
        return tokens.crop, tokens.crops
    # a ViT row is one crop (LLaVA-1.5: the image; LLaVA-NeXT: one of its crops)
    return torch.zeros(g, n, dtype=torch.long, device=device), 1


def _select(stage: ResolvedStage, view: StageView, terms: list[ops.TermSpec], needs_features: bool) -> Tensor:
    """``[G, k]``: the candidates the terms keep, ascending."""
    x, tokens = view.x, view.tokens
    g, n, _ = x.shape
    region_ids, num_regions = _regions(stage, x, tokens)
    weights = terms[0].scores if stage.region_proportional or stage.region_softmax is not None else None
    if weights is None and stage.region is not None and stage.region[0] == "segment":
        # the clip's own segment count: equal weights share the budget evenly over the
        # segments present, none to the empty ids (per_region's shares)
        weights = torch.ones(g, n, device=x.device)
    return ops.select_union(
        terms,
        n=n,
        positions=tokens.gpos,
        grid=tokens.grid,
        features=x if needs_features else None,
        region_ids=region_ids,
        num_regions=num_regions,
        region_weights=weights,
        region_softmax=stage.region_softmax,
        batch=g,
    )


# ------------------------------------------------------------- keep: what happens to the rest
def _rest(stage: ResolvedStage, view: StageView, kept: Tensor,
          first_scores: Tensor | None) -> tuple[Tensor, Tensor, Tokens]:
    """The output: the kept tokens, then what the stage's rest option (vtdsl.ops.rest)
    makes of the others."""
    if stage.rest is None:
        return ops.gather_tokens(view.x, kept), kept, view.tokens.take(kept)
    try:
        out, src = stage.rest.run(view.x, kept, first_scores, view)
    except MissingInput as exc:
        raise CompileError(f"stage at {stage.site.text()}: {exc}") from None
    return out, src, view.tokens.take(src)


@dataclass
class ForwardLog:
    """What the stages of the last forward did, for `kept_counts` / `kept_tokens`.

    Keys are ``"<site>#<stage index>"``. `kept`: ViT stages, the `vid` of each output
    token ``[images, k]`` (1 + raster patch index; merged tokens: their target);
    LLM stages, the prompt position of each kept visual token ``[batch, images·k]``.
    """

    vit: dict[str, tuple[int, int]] = field(default_factory=dict)  # (in, out) per image
    llm: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept: dict[str, Tensor] = field(default_factory=dict)
    # Only when `record` is set (vtdsl show): per stage, the `vid` of every input and output
    # token ``[images, n]`` / ``[images, k]`` and the first scored term's scores ``[images, n]``.
    record: bool = False
    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)

    def run(self, key: str, stage: ResolvedStage, view: StageView) -> tuple[Tensor, Tensor, Tokens]:
        """`execute`, recording what the stage saw and chose when `record` is set."""
        if not self.record:
            return execute(stage, view)
        self.inputs[key] = view.tokens.vid
        values, src, new = execute(stage, view, on_scores=lambda s: self.scores.__setitem__(key, s))
        self.outputs[key] = new.vid
        return values, src, new
