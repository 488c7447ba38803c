"""Analytic cost of one prefill (and one decode step) under a token-reduction plan.

Pure-Python integer arithmetic over per-layer token counts, with the per-model constants
computed once per spec. docs/cost-model.md gives every formula; in short, with N the
sequence length at a layer, per layer:

    hf     : 2N·(2·d·qd + 2·d·kvd + k·d·ffn) + 4·N²·qd        (k = 2 gelu, 3 swiglu)
    fastv  : 4·N·d² + 2·N²·d + 2·N·d·ffn                       (LLM layers only)

where qd = heads·head_dim and kvd = kv_heads·head_dim. The `hf` convention equals
`torch.utils.flop_counter.FlopCounterMode` on the instantiated transformers model (sdpa on
meta tensors; attention at full N², causal or not): ViT layers + patch conv, projector,
LLM layers, lm_head on the last position (`logits="last"`, generate's prefill) or on all.
Both are rows of `vtdsl.cost.conventions.CONVENTIONS`, with the other papers' ways of
counting. `vtdsl.cost.estimate` sums them into reports (and gives an adaptive plan's
counts at a measured mean).
"""

from __future__ import annotations

from operator import mul
from typing import Literal

from ..models.spec import ModelSpec
from .conventions import CONVENTIONS, llm_coefficients
from ..ops.scorers import ScoreSize, by_canonical

Logits = Literal["last", "all"]
PARTS = ("vit", "projector", "llm", "lm_head", "scorers")


class _Constants:
    """Per-spec coefficients: every sum over layers reduces to a·ΣN + b·ΣN²."""

    __slots__ = (
        "spec", "vit_layers", "vit_window", "vit_window_pairs", "vit_lin", "vit_att", "vit_d", "vit_qd", "patch", "crops", "proj",
        "deepstack",
        "llm_layers", "llm_lin", "llm_att", "llm_d", "llm_qd", "head", "fastv_lin", "fastv_att",
        "kv_token", "base_vit", "base_llm", "base_proj", "baselines",
    )

    def __init__(self, spec: ModelSpec):
        v, t = spec.vit, spec.llm
        self.spec = spec
        self.vit_layers = v.layers
        # q and o: d·qd each; k and v: d·kvd each; MLP: k matmuls of d·ffn. 2 FLOPs per MAC.
        self.vit_lin = 2 * (2 * v.hidden * v.q_width + 2 * v.hidden * v.kv_width + v.mlp_matmuls * v.hidden * v.ffn)
        self.vit_att = 4 * v.q_width  # QKᵀ and AV: 2·N·N·qd each
        self.vit_d, self.vit_qd = v.hidden, v.q_width
        self.patch = 2 * spec.patch_tokens * spec.channels * spec.temporal_patch * spec.patch_size**2 * v.hidden
        # window attention: per layer, the tokens of one window (0: the whole crop)
        self.vit_window = [0 if not spec.vit_window or i in spec.vit_full_attention else spec.vit_window
                           for i in range(v.layers)]
        self.vit_window_pairs = spec.vit_window_pairs if spec.vit_window else 0
        self.crops = spec.vit_crops
        self.proj = 2 * sum(a * b for a, b in zip(spec.projector, spec.projector[1:]))
        # DeepStack: a merger of the projector's widths on each listed ViT layer's output
        self.deepstack = spec.deepstack_layers
        self.llm_layers = t.layers
        # the two conventions every Side reports are rows of the conventions table
        self.llm_lin, self.llm_att = llm_coefficients(CONVENTIONS["hf"], t)
        self.llm_d, self.llm_qd = t.hidden, t.q_width
        self.head = 2 * t.hidden * spec.vocab_size
        self.fastv_lin, self.fastv_att = llm_coefficients(CONVENTIONS["fastv"], t)
        self.kv_token = 2 * t.kv_heads * t.head_dim * spec.dtype_bytes
        self.base_vit = [spec.vit_tokens] * v.layers
        self.base_llm = [spec.image_tokens] * t.layers
        self.base_proj = spec.projector_tokens
        self.baselines: dict[tuple, "Side"] = {}

    def vit_pairs(self, i: int, n: int) -> int:
        """Attention (query, key) pairs of ViT layer i on n tokens of one crop: n² over the
        whole crop; in windows, Σ_w n_w² (edge windows partial) for the whole grid, n·w
        (full windows) once a stage pruned it."""
        w = self.vit_window[i]
        if not w:
            return n * n
        if n == self.spec.vit_tokens:
            return self.vit_window_pairs
        return n * min(n, w)

    def vit_layer(self, i: int, n: int) -> int:
        """FLOPs of ViT layer i on n tokens of one crop."""
        return self.vit_lin * n + self.vit_att * self.vit_pairs(i, n)


_CONSTANTS: dict[int, _Constants] = {}


def constants(spec: ModelSpec) -> _Constants:
    k = _CONSTANTS.get(id(spec))
    if k is None or k.spec is not spec:
        if len(_CONSTANTS) >= 64:  # specs made on the fly (user configs) must not pile up
            _CONSTANTS.clear()
        k = _CONSTANTS[id(spec)] = _Constants(spec)
    return k


class Side:
    """Costs of one side (baseline or policy) of a comparison. FLOPs are per image."""

    __slots__ = ("vit", "projector", "llm", "lm_head", "scorers", "fastv", "kv_bytes", "decode", "visual")

    def __init__(self, vit, projector, llm, lm_head, scorers, fastv, kv_bytes, decode, visual):
        self.vit, self.projector, self.llm, self.lm_head, self.scorers = vit, projector, llm, lm_head, scorers
        self.fastv, self.kv_bytes, self.decode, self.visual = fastv, kv_bytes, decode, visual

    @property
    def flops(self) -> int:
        """Total `hf` FLOPs: ViT + projector + LLM + lm_head + scorer extras."""
        return self.vit + self.projector + self.llm + self.lm_head + self.scorers

    def by_part(self) -> dict[str, int]:
        return {p: getattr(self, p) for p in PARTS}

    def __repr__(self) -> str:
        return f"Side(flops={self.flops}, fastv={self.fastv}, kv_bytes={self.kv_bytes}, visual={self.visual})"


def _side(k: _Constants, vit_tokens, projector_tokens, llm_visual, T, logits, ctx, scorers) -> Side:
    sv1 = sum(vit_tokens)
    # attention pairs per layer: N² over the whole crop, Σ_w n_w² in windows
    sv2 = sum(k.vit_pairs(i, n) for i, n in enumerate(vit_tokens))
    vit = k.crops * (k.patch + k.vit_lin * sv1 + k.vit_att * sv2) + deepstack_flops(k, projector_tokens)
    L = k.llm_layers
    sl1 = sum(llm_visual)
    sl2 = sum(map(mul, llm_visual, llm_visual))
    n1 = L * T + sl1  # Σ_layers N
    n2 = L * T * T + 2 * T * sl1 + sl2  # Σ_layers N²
    llm = k.llm_lin * n1 + k.llm_att * n2
    head = k.head if logits == "last" else k.head * (T + llm_visual[-1])
    # decode: one new token; layer l attends to its cache (N_l + ctx) plus itself.
    decode = k.llm_lin * L + k.llm_att * (n1 + L * (ctx + 1)) + k.head
    return Side(
        vit,
        k.proj * projector_tokens,
        llm,
        head,
        scorers,
        k.fastv_lin * n1 + k.fastv_att * n2,
        k.kv_token * n1,
        decode,
        llm_visual[0] if llm_visual else projector_tokens,
    )


def deepstack_flops(k: _Constants, projector_tokens: int) -> int:
    """DeepStack's mergers, each as wide as the projector: the compiled tower runs them on
    the merge units its merger reads (`vtdsl.compiler.merge_units`), the unpruned one on
    all of them, so on the projector's input either way."""
    return len(k.deepstack) * k.proj * projector_tokens


def decode_selected(spec: ModelSpec, decode: int, llm_visual, T: int, ctx: int, layer: int, k: int) -> int:
    """`decode` (one step's FLOPs) when layers `layer`.. attend to `k` of their visual
    entries (a decode stage), plus the selection's own row of q·Kᵀ at layer `layer - 1`
    over its whole cache (half of that layer's attention, 2·qd per key)."""
    c = constants(spec)
    saved = sum(c.llm_att * (llm_visual[j] - k) for j in range(layer, c.llm_layers))
    return decode - saved + c.llm_att // 2 * (T + llm_visual[layer - 1] + ctx + 1)


# ------------------------------------------------------------------ scorer extras
_ONE_QUERY = ("cls", "last_text")  # the query rows an input-side score projects: one, or all


def observation_flops(k: _Constants, obs, vit_tokens, llm_visual, T: int) -> int:
    """The extra work of one observation: its scorer entry's cost (`2·m·n·H·dh` for an
    attention score, docs/dev/contracts.md) at the layer it reads; on an LLM layer's own
    input, plus the projections that layer's input needs."""
    cost = by_canonical(obs.scorer).cost
    if obs.tower == "vit":
        n = vit_tokens[obs.layer]
        return k.crops * cost(obs, ScoreSize(n=n, visual=n - int(k.spec.has_cls), text=0, width=k.vit_qd,
                                             head_width=k.spec.vit.head_dim))
    if not obs.on_input:
        visual = llm_visual[obs.layer]
        return cost(obs, ScoreSize(n=T + visual, visual=visual, text=T, width=k.llm_qd))
    # on the tokens entering the layer, before its stage: the layer's k projection of
    # every token and its q projection of the query rows, then the score itself
    visual = llm_visual[obs.layer - 1]
    n = T + visual
    score = cost(obs, ScoreSize(n=n, visual=visual, text=T, width=k.llm_qd))
    q_rows = 1 if obs.queries in _ONE_QUERY else n
    spec_t = k.spec.llm
    return 2 * n * spec_t.hidden * spec_t.kv_width + 2 * q_rows * spec_t.hidden * spec_t.q_width + score


def stage_flops(k: _Constants, stage) -> int:
    """Matmul work of a stage's selectors and merges (docs/dev/contracts.md); a ViT stage
    runs once per crop."""
    if stage.site.tower == "vit":
        # in the tower a candidate is one merge unit, its m² patch rows side by side; vit.out
        # works on the projector's input (merged tokens, wider than a patch on some models),
        # or, where the tower merges units itself (Qwen-VL), on the merger's output
        d = k.vit_d * k.spec.vit_units
        if stage.site.layer is None and k.spec.merged_features:
            d = k.spec.projector[0]
        elif stage.site.layer is None and k.spec.packed_units:
            d = k.spec.projector[-1]
        return k.crops * _stage_flops(stage, d, k.spec.vit.head_dim)
    return _stage_flops(stage, k.llm_d)


def _stage_flops(stage, d: int, head_dim: int = 0) -> int:
    action = stage.action
    if action == "keep":
        total = 0
        n = stage.tokens_in
        for term in stage.terms:
            if term.kind == "diverse" or term.kind == "unique":
                total += 2 * n * n * d  # one pairwise cosine matrix, shared by the stage
                break
        for term in stage.terms:
            if term.kind == "far":  # the pivots' cosine against every token: [P, d] x [d, n]
                total += 2 * (term.count // term.per_pivot) * n * d
        if stage.rest is not None:  # what happens to the rest: its option counts it
            total += stage.rest.flops(stage, d, head_dim)
        return total
    if action == "merge":
        n = stage.tokens_in
        return 2 * ((n + 1) // 2) * (n // 2) * d  # ToMe: alternate A/B, one |A|x|B| matrix
    return 0


def rater_flops(k: _Constants, observations, llm_visual, T: int) -> int:
    """SparseVLM's raters, chosen once per prompt if a score reads them: the visual
    tokens entering the LLM against every text token, ``2·V·T·d``."""
    if not any(o.queries == "raters" for o in observations):
        return 0
    return 2 * llm_visual[0] * T * k.llm_d


def _scorer_total(k, vit_tokens, llm_visual, T, observations, stages) -> int:
    total = rater_flops(k, observations, llm_visual, T)
    for obs in observations:
        total += observation_flops(k, obs, vit_tokens, llm_visual, T)
    for stage in stages:
        total += stage_flops(k, stage)
    return total


# ------------------------------------------------------------------ entry points
def _baseline(k: _Constants, T: int, logits: str, ctx: int) -> Side:
    key = (T, logits, ctx)
    side = k.baselines.get(key)
    if side is None:
        side = _side(k, k.base_vit, k.base_proj, k.base_llm, T, logits, ctx, 0)
        if len(k.baselines) > 256:
            k.baselines.clear()
        k.baselines[key] = side
    return side
