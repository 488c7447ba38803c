"""Throughput of the analytic cost model on a llava-1.5-7b policy.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cost.py [--seconds 2]

The plan is built by hand (the shape the IR produces): a VisionZip-style stage after the
ViT (CLS-attention top 54 + merge rest into 10), then a FastV-style stage at LLM layer 2
scored by last-text attention of layer 1, and a diverse stage at layer 16. Prints
estimates per second for `estimate(plan)` and for `estimate_counts` (no plan).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vtdsl.cost import estimate, estimate_counts  # noqa: E402
from vtdsl.ir.plan import (  # noqa: E402
    Observation,
    Plan,
    ResolvedScore,
    ResolvedSite,
    ResolvedStage,
    ResolvedTerm,
)
from vtdsl.lang.ast import Policy  # noqa: E402
from vtdsl.models import get_spec  # noqa: E402
from vtdsl.ops.rest.merge import Merged  # noqa: E402


def make_plan():
    spec = get_spec("llava-1.5-7b")
    cls_obs = Observation("cls", (), "vit", spec.feature_layer_index, "cls")
    last_obs = Observation("attn", ("last_text",), "llm", 1, "last_text")
    stages = [
        ResolvedStage(
            index=0,
            site=ResolvedSite("vit", None),
            action="keep",
            tokens_in=576,
            tokens_out=64,
            terms=(ResolvedTerm("top", 54, ResolvedScore("leaf", cls_obs)),),
            rest=Merged(10),
        ),
        ResolvedStage(
            index=1,
            site=ResolvedSite("llm", 2),
            action="keep",
            tokens_in=64,
            tokens_out=32,
            terms=(ResolvedTerm("top", 32, ResolvedScore("leaf", last_obs)),),
        ),
        ResolvedStage(
            index=2,
            site=ResolvedSite("llm", 16),
            action="keep",
            tokens_in=32,
            tokens_out=16,
            terms=(ResolvedTerm("diverse", 16),),
        ),
    ]
    llm_visual = [64, 64] + [32] * 14 + [16] * 16
    return Plan(Policy(), spec, stages, [577] * 24, 64, llm_visual)


def rate(fn, seconds: float) -> float:
    for _ in range(2000):  # warm-up
        fn()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        n = 5000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    plan = make_plan()
    spec = plan.spec
    report = estimate(plan)
    print(report)
    plan_rate = rate(lambda: estimate(plan), args.seconds)
    counts_rate = rate(
        lambda: estimate_counts(spec, plan.vit_tokens, plan.projector_tokens, plan.llm_visual, 64), args.seconds
    )
    print(f"estimate(plan):         {plan_rate:,.0f} evals/sec (best of repeated batches of 5000)")
    print(f"estimate_counts(...):   {counts_rate:,.0f} evals/sec")


if __name__ == "__main__":
    main()
