"""vtdsl's own share of the prefill for the published-method constructs (issue 10).

    .venv/bin/python benchmarks/bench_methods.py [--repeats 7] [--threads 1]

The benchmark model (benchmarks/_common.py: llava-1.5 geometry, reduced widths, 8 ViT and
8 LLM layers) runs one prefill (``model(**inputs, logits_to_keep=1)``) under policies
written with each construct the zoo uses beyond top-k: adaptive counts (PruMerge's IQR
rule, FlowCut's entropy rule and running score), `far` with text pivots (DART), `text(raters)` with
`recycle` (SparseVLM), `top H heads`, `then absorb`, spatial cells (VFlowOpt). Each
configuration is instrumented as in bench_prefill.py's overhead pass (benchmarks/
hooktimer.py): CPU time per forward of every vtdsl hook, and of the score and stage
functions nested in them ("score + select": scoring, the count rule, the selection and
the gather / merge). Medians of `--repeats` runs after a warm-up; target: score + select
<= 3 % of the forward, as for the plain policies.
"""

from __future__ import annotations

import argparse

import _common as C

METHODS = {
    "prumerge (outliers + absorb)": "at vit.out keep cls top 25% by outliers then absorb 32",
    "flowcut (ema + entropy cuts)": (
        "at vit.layer2 keep prod(sum(share(cls), share(vsim)), vnorm)@vit.layer0..1 ema top 64 by entropy(cls) "
        "over 4 layers\n"
        "at vit.layer4 keep prod(sum(share(cls), share(vsim)), vnorm)@vit.layer0..3 ema top 64 by entropy(cls) "
        "over 2 layers\n"
        "at vit.layer6 keep prod(sum(share(cls), share(vsim)), vnorm)@vit.layer0..5 ema top 64"),
    "dart (far, text pivots)": "at llm.layer2 keep knorm top 4 + far 128 with 4 text pivots by knorm",
    "sparsevlm (raters + recycle)": ("at llm.layer2 keep text(raters) top 300 then recycle 83 into 9 renumber\n"
                                     "at llm.layer4 keep text(raters) top 200 then recycle 33 into 4 renumber"),
    "top 4 heads": "at llm.layer2 keep text(all, top 4 heads) top 128",
    "vflowopt cells": "at vit.out keep cls top 64 then recycle rest into 2x2 cells",
}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see README)")
    args = parser.parse_args()

    import torch

    import vtdsl.compiler as vc
    from hooktimer import HookTimer

    C.set_threads(args.threads)
    machine = C.header("issue-10 constructs: vtdsl's share of the prefill")
    model = C.build_model("sdpa")
    inputs = C.make_inputs()

    def prefill():
        with torch.inference_mode():
            return model(**inputs, logits_to_keep=1)

    prefill()
    unpruned = []
    for _ in range(args.repeats):
        C.gc.collect()
        with C.Stopwatch() as sw:
            prefill()
        unpruned.append(sw.cpu)
    rows = []
    for name, source in METHODS.items():
        before = HookTimer.snapshot(model)
        vc.compile(source, model)
        timer = HookTimer(model, before)
        try:
            prefill()  # warm-up
            runs = []
            for _ in range(args.repeats):
                C.gc.collect()
                timer.reset()
                with C.Stopwatch() as sw:
                    prefill()
                runs.append((sw.cpu, timer.total, timer.stage))
            counts = vc.kept_counts(model)
        finally:
            timer.remove()
            vc.uncompile(model)
        rows.append({
            "method": name,
            "source": source,
            "kept": counts,
            "forward_cpu_ms": C.med([r[0] for r in runs]) * 1e3,
            "hooks_cpu_ms": C.med([r[1] for r in runs]) * 1e3,
            "stages_cpu_ms": C.med([r[2] for r in runs]) * 1e3,
            "stages_share": C.med([r[2] / r[0] for r in runs]),
            "hooks_share": C.med([r[1] / r[0] for r in runs]),
        })
    print(f"\n   unpruned forward {C.med(unpruned) * 1e3:.1f} CPU ms; median of {args.repeats} runs")
    print(f"   {'method':<30}{'forward ms':>11}{'hooks ms':>10}{'hooks %':>9}{'score+sel ms':>13}{'score+sel %':>12}")
    for r in rows:
        print(f"   {r['method']:<30}{r['forward_cpu_ms']:>11.1f}{r['hooks_cpu_ms']:>10.2f}{r['hooks_share']:>9.2%}"
              f"{r['stages_cpu_ms']:>13.2f}{r['stages_share']:>12.2%}")
    worst = max(r["stages_share"] for r in rows)
    print(f"\n   target score + select <= 3 %: {'met' if worst <= 0.03 else 'MISSED'} (worst {worst:.2%})")
    result = {"machine": machine, "repeats": args.repeats, "unpruned_forward_cpu_ms": C.med(unpruned) * 1e3,
              "rows": rows, "worst_stages_share": worst}
    C.save("methods", result)
    return result


if __name__ == "__main__":
    main()
