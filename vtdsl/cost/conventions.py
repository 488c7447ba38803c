"""FLOP-counting conventions as data: one row per way papers count, one evaluator.

Papers on visual-token reduction report FLOPs in incompatible ways: a multiply-add is 1
FLOP or 2, the SwiGLU MLP is counted with 2 matrices or 3, the LLM alone or the whole
model, the whole prompt or the image tokens only, a total or a per-layer mean. Each way
is a `Convention` row in `CONVENTIONS`; `llm_coefficients` and `evaluate` turn any row
into a figure from the per-layer token counts the cost model already has. `hf` and
`fastv` are the two conventions `Side.flops` / `Side.fastv` report (the cost model takes
its LLM coefficients from these rows). docs/cost-model.md lists which paper figures each
row reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import mul
from typing import Literal, Sequence

Scope = Literal["llm", "model"]
Tokens = Literal["prompt", "image"]
Widths = Literal["model", "square"]


@dataclass(frozen=True)
class Convention:
    """How one community counts the FLOPs of a prefill.

    `mac`: FLOPs per multiply-add (2: FlopCounterMode; 1: FastV's `4nd² + 2n²d + 2ndm`).
    `ffn`: the LLM MLP's matrices (None: the model's own, 2 for GELU, 3 for SwiGLU).
    `widths`: "model" counts q/o at heads·head_dim and k/v at kv_heads·head_dim (GQA);
    "square" counts all four projections and attention at the hidden width d (the papers'
    `4nd²`, GQA ignored). `scope`: "llm" is the decoder layers only; "model" adds the ViT,
    projector, lm_head and the scorers' extra matmuls (their FlopCounterMode figures
    scaled by `mac / 2`). `tokens`: N per layer is the prompt (text + visual) or the
    visual tokens only. `total`: the sum over LLM layers, or (False) the mean per layer.
    `logits`: lm_head rows ("last" or "all") for `scope="model"`; None takes the report's.
    """

    name: str
    mac: int
    ffn: int | None
    widths: Widths
    scope: Scope
    tokens: Tokens
    total: bool
    logits: str | None
    source: str

    def __post_init__(self) -> None:
        if self.mac not in (1, 2):
            raise ValueError(f"convention {self.name}: mac must be 1 or 2, not {self.mac}")
        if self.ffn not in (None, 2, 3):
            raise ValueError(f"convention {self.name}: ffn must be None, 2 or 3, not {self.ffn}")
        if self.scope == "model" and not self.total:
            raise ValueError(f"convention {self.name}: a per-layer figure counts the LLM only")
        if self.logits not in (None, "last", "all"):
            raise ValueError(f"convention {self.name}: logits must be None, 'last' or 'all'")


_ROWS = (
    Convention("hf", 2, None, "model", "model", "prompt", True, None,
               "torch FlopCounterMode on the transformers model (sdpa, full N² attention)"),
    Convention("fastv", 1, 2, "square", "llm", "prompt", True, None,
               "FastV (arXiv 2403.06764) §4: Σ_layers 4nd² + 2n²d + 2ndm over the prompt"),
    Convention("divprune", 1, 2, "square", "llm", "prompt", True, None,
               "DivPrune's tflops.py (github vbdi/divprune): FastV's formula, averaged over "
               "per-benchmark prompt lengths (--text-tokens a,b,c)"),
    Convention("pdrop", 1, 3, "square", "llm", "image", True, None,
               "PyramidDrop (arXiv 2410.17247) appendix: 4nd² + 2n²d + 3ndm over the image tokens"),
    Convention("sparsevlm", 1, 3, "square", "llm", "prompt", True, None,
               "SparseVLM's code (github Gumpest/SparseVLMs, modelling_sparse_llama.py): "
               "4nd² + 2n²d + 3ndm per layer over the whole prompt, averaged over samples"),
    Convention("llm", 2, None, "model", "llm", "prompt", True, None,
               "the LLM layers as FlopCounterMode counts them (no ViT, projector, lm_head)"),
    Convention("fastv-per-layer", 1, 2, "square", "llm", "prompt", False, None,
               "FastV's formula as a mean per LLM layer"),
)

CONVENTIONS: dict[str, Convention] = {row.name: row for row in _ROWS}


def get_convention(name: str) -> Convention:
    try:
        return CONVENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown FLOPs convention {name!r}; expected one of: {', '.join(CONVENTIONS)}") from None


def llm_coefficients(conv: Convention, tower) -> tuple[int, int]:
    """(a, b) with one LLM layer on N tokens costing `a·N + b·N²` under `conv`
    (`tower`: the spec's LLM `TowerDims`)."""
    d = tower.hidden
    if conv.widths == "square":
        q = kv = d
    else:
        q, kv = tower.q_width, tower.kv_width
    ffn = tower.mlp_matmuls if conv.ffn is None else conv.ffn
    return conv.mac * (2 * d * q + 2 * d * kv + ffn * d * tower.ffn), 2 * conv.mac * q


def newline_tokens(spec) -> int:
    """The learned newline tokens an intact LLaVA-NeXT layout puts in the LLM (one per
    row of the grid crops' map); 0 for other models."""
    if not spec.packs_crops or not spec.image_newline:
        return 0
    return spec.crop_map[0]


def without_newlines(spec, llm_visual: Sequence[int]) -> list[int]:
    """`llm_visual` counted without the newline tokens: a layer that still sees the intact
    layout (`spec.image_tokens`) loses them; a pruned count is what the LLM sees."""
    rows = newline_tokens(spec)
    return [v - rows if rows and v == spec.image_tokens else v for v in llm_visual]


def llm_flops(conv: Convention, spec, llm_visual: Sequence[int], text_tokens: int) -> int:
    """Σ over LLM layers of `a·N + b·N²`, N = text + visual (prompt) or visual (image)."""
    a, b = llm_coefficients(conv, spec.llm)
    t = text_tokens if conv.tokens == "prompt" else 0
    layers = len(llm_visual)
    s1 = sum(llm_visual)
    s2 = sum(map(mul, llm_visual, llm_visual))
    n1 = layers * t + s1
    n2 = layers * t * t + 2 * t * s1 + s2
    return a * n1 + b * n2


def evaluate(conv: Convention, spec, side, llm_visual: Sequence[int], text_tokens: int, logits: str,
             newlines: bool = True) -> float:
    """The figure `conv` gives for one side of a report (a `Side` with its `llm_visual`).

    An integer for totals; per-layer figures are means (a float when not whole).
    `newlines=False` counts LLaVA-NeXT without its newline tokens."""
    if not newlines:
        llm_visual = without_newlines(spec, llm_visual)
    flops = llm_flops(conv, spec, llm_visual, text_tokens)
    if conv.scope == "model":
        t = text_tokens if conv.tokens == "prompt" else 0
        head = side.lm_head
        rows = conv.logits or logits
        if rows != logits:  # this convention fixes the lm_head rows the report did not use
            head = 2 * spec.llm.hidden * spec.vocab_size * (1 if rows == "last" else t + llm_visual[-1])
        flops += (side.vit + side.projector + head + side.scorers) * conv.mac // 2
    if conv.total:
        return flops
    per_layer = flops / len(llm_visual)
    return int(per_layer) if per_layer.is_integer() else per_layer


__all__ = ["CONVENTIONS", "Convention", "evaluate", "get_convention", "llm_coefficients", "newline_tokens"]
