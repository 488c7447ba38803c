"""Analytic cost model: FLOPs (hf and FastV conventions), KV-cache bytes, decode FLOPs,
and budget verdicts. See docs/cost-model.md for every formula.

    from vtdsl.cost import estimate, verdicts
    report = estimate(plan, text_tokens=64)          # plan: vtdsl.ir.plan.Plan
    report.flops_ratio, report.to_json()
    verdicts(report, plan.policy.budgets)

`estimate_counts(spec, vit_tokens, projector_tokens, llm_visual, text_tokens)` costs raw
per-layer token counts without a Plan (search loops call it many thousand times a second).
"""

from .budget import METRICS, budget_text, over_budget, parse_budget, verdicts
from .estimate import estimate, estimate_counts
from .model import PARTS, Side
from .report import CostReport

__all__ = [
    "METRICS",
    "PARTS",
    "CostReport",
    "Side",
    "budget_text",
    "estimate",
    "estimate_counts",
    "over_budget",
    "parse_budget",
    "verdicts",
]
