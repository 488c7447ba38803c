"""Prefill latency, unpruned vs compiled, and vtdsl's own share of the compiled prefill.

    .venv/bin/python benchmarks/bench_prefill.py [--repeats 7] [--threads 1]

Issue 8, items 1 and 2. The benchmark model (benchmarks/_common.py: llava-1.5 geometry,
577 ViT tokens, 576 visual tokens into the LLM, reduced widths) runs one prefill, i.e. one
forward with the image and the 640-token prompt
(``model(input_ids, pixel_values, attention_mask, logits_to_keep=1)``: ViT, projector, LLM,
last-position logits; the work generate does before its first token), unpruned and under
six zoo-style policies keeping 192 / 128 / 64 visual tokens: VisionZip-style after the ViT,
FastV-style entering LLM layer 2.

Timing: one warm-up per configuration, then `--repeats` rounds in which every
configuration runs once, round-robin (the plan is installed before and removed after each
timed call; installing is not timed), so load from other processes hits all of them
alike. Each call is timed in process CPU time (the headline with one torch thread: it is
the compute the call needed, and does not grow while another process holds our core) and
in wall-clock time. Reported: medians, IQR/median, speedup = median(unpruned) /
median(policy) (and the median of per-round ratios as a check), the FLOPs-ideal speedup
from the cost model, and efficiency = measured / ideal.

Overhead (item 2): a second, instrumented pass times every hook and fx node the compiler
installed and, nested inside them, the score and stage functions (benchmarks/hooktimer.py),
as shares of the same forward's CPU time; it also splits the forward into ViT, projector,
LLM, lm_head, vtdsl and the rest, to show where the efficiency gap comes from.
"""

from __future__ import annotations

import argparse

import _common as C


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see README)")
    parser.add_argument("--policies", nargs="*", default=list(C.POLICIES))
    args = parser.parse_args()

    import torch

    import vtdsl.compiler as vc
    from hooktimer import HookTimer, PartTimer

    C.set_threads(args.threads)
    machine = C.header("prefill: unpruned vs compiled")
    model = C.build_model("sdpa")
    inputs = C.make_inputs()
    plans = {name: vc.resolve_plan(C.POLICIES[name], model) for name in args.policies}

    def prefill():
        with torch.inference_mode():
            return model(**inputs, logits_to_keep=1)

    # --------------------------------------------------------------- item 1: latency
    fns = {"unpruned": C.plain_call(prefill), **{name: C.compiled_call(model, plan, prefill)
                                                  for name, plan in plans.items()}}
    cpu, wall = C.interleaved(fns, args.repeats)
    base_cpu, base_wall = C.med(cpu["unpruned"]), C.med(wall["unpruned"])
    rows = []
    print(f"\n   {'config':<15}{'kept':>5}{'cpu ms':>9}{'IQR':>7}{'wall ms':>9}{'IQR':>7}"
          f"{'speedup':>9}{'paired':>8}{'wall':>7}{'ideal':>7}{'effic.':>8}{'wall':>7}")
    print(f"   {'unpruned':<15}{576:>5}{base_cpu * 1e3:>9.1f}{C.spread(cpu['unpruned']):>7.1%}"
          f"{base_wall * 1e3:>9.1f}{C.spread(wall['unpruned']):>7.1%}")
    for name in plans:
        ideal = C.ideal(C.POLICIES[name])
        t, tw = C.med(cpu[name]), C.med(wall[name])
        row = {
            "policy": name,
            "source": C.POLICIES[name],
            "kept": C.kept_tokens_of(name),
            "cpu_ms": t * 1e3,
            "cpu_iqr_over_median": C.spread(cpu[name]),
            "wall_ms": tw * 1e3,
            "wall_iqr_over_median": C.spread(wall[name]),
            "speedup": base_cpu / t,
            "speedup_paired": C.paired_ratio(cpu["unpruned"], cpu[name]),
            "speedup_wall": base_wall / tw,
            "ideal_speedup": ideal["ideal_speedup"],
            "flops_ratio": ideal["flops_ratio"],
            "runs_cpu_ms": [x * 1e3 for x in cpu[name]],
            "runs_wall_ms": [x * 1e3 for x in wall[name]],
        }
        row["efficiency"] = row["speedup"] / row["ideal_speedup"]
        row["efficiency_wall"] = row["speedup_wall"] / row["ideal_speedup"]
        rows.append(row)
        print(f"   {name:<15}{row['kept']:>5}{t * 1e3:>9.1f}{row['cpu_iqr_over_median']:>7.1%}{tw * 1e3:>9.1f}"
              f"{row['wall_iqr_over_median']:>7.1%}{row['speedup']:>9.2f}{row['speedup_paired']:>8.2f}"
              f"{row['speedup_wall']:>7.2f}{row['ideal_speedup']:>7.2f}{row['efficiency']:>8.2f}"
              f"{row['efficiency_wall']:>7.2f}")

    # --------------------------------------------------------------- item 2: overhead
    # A second, instrumented pass: vtdsl's hooks and fx nodes (HookTimer) and the model's
    # parts (PartTimer), CPU time per forward; medians over the runs.
    from vtdsl.cost import estimate

    overhead, breakdown = [], []
    for name in ["unpruned", *plans]:
        plan = plans.get(name)
        before = HookTimer.snapshot(model)
        if plan is not None:
            vc.compile(plan, model)
        timer = HookTimer(model, before) if plan is not None else None
        parts = PartTimer(model)
        try:
            prefill()  # warm-up
            runs = []
            for _ in range(args.repeats):
                C.gc.collect()
                parts.reset()
                if timer:
                    timer.reset()
                with C.Stopwatch() as sw:
                    prefill()
                runs.append({
                    "cpu": sw.cpu, "wall": sw.wall, **dict(parts.totals),
                    "hooks": timer.total if timer else 0.0,
                    "hooks_wall": timer.total_wall if timer else 0.0,
                    "stages": timer.stage if timer else 0.0,
                    "sites": dict(timer.totals) if timer else {},
                })
        finally:
            parts.remove()
            if timer:
                timer.remove()
            if plan is not None:
                vc.uncompile(model)

        def m(key):
            return C.med([r[key] for r in runs])

        report = estimate(C.check_policy(C.POLICIES.get(name, "at llm.layer2 keep text top 100%")),
                          text_tokens=C.TEXT_TOKENS)
        side = report.policy if plan is not None else report.baseline
        # a part's own time excludes the vtdsl hooks that ran inside it (by module path)
        for r in runs:
            for part, path in PartTimer.PARTS.items():
                inside = sum(v for k, v in r["sites"].items() if k.startswith(path + "."))
                r[part + "_own"] = r[part] - inside
            r["rest"] = r["cpu"] - r["hooks"] - sum(r[p + "_own"] for p in PartTimer.PARTS)
        row = {"config": name, "forward_cpu_ms": m("cpu") * 1e3}
        for part in PartTimer.PARTS:
            row[f"{part}_cpu_ms"] = m(part + "_own") * 1e3
        row["vtdsl_cpu_ms"] = m("hooks") * 1e3
        row["rest_cpu_ms"] = m("rest") * 1e3
        row["vit_gflops"] = side.vit / 1e9
        row["llm_gflops"] = side.llm / 1e9
        row["vit_gflop_per_s"] = side.vit / m("vit_own") / 1e9
        row["llm_gflop_per_s"] = side.llm / m("llm_own") / 1e9
        breakdown.append(row)
        if plan is None:
            continue
        sites = {k: C.med([r["sites"].get(k, 0.0) for r in runs]) * 1e3 for k in runs[0]["sites"]}
        top = max(sites.items(), key=lambda kv: kv[1])
        overhead.append({
            "policy": name,
            "forward_cpu_ms": m("cpu") * 1e3,
            "hooks_cpu_ms": m("hooks") * 1e3,
            "hooks_share": C.med([r["hooks"] / r["cpu"] for r in runs]),
            "hooks_share_wall": C.med([r["hooks_wall"] / r["wall"] for r in runs]),
            "stages_cpu_ms": m("stages") * 1e3,
            "stages_share": C.med([r["stages"] / r["cpu"] for r in runs]),
            "largest_site": top[0],
            "sites_cpu_ms": sites,
        })

    print(f"\n   vtdsl's own time inside the compiled prefill (CPU time, median of {args.repeats} instrumented runs)")
    print(f"   {'config':<15}{'forward ms':>11}{'hooks ms':>10}{'hooks %':>9}{'score+sel ms':>13}{'score+sel %':>12}"
          f"{'wall %':>8}   largest site")
    for row in overhead:
        print(f"   {row['policy']:<15}{row['forward_cpu_ms']:>11.1f}{row['hooks_cpu_ms']:>10.2f}"
              f"{row['hooks_share']:>9.2%}{row['stages_cpu_ms']:>13.2f}{row['stages_share']:>12.2%}"
              f"{row['hooks_share_wall']:>8.2%}   {row['largest_site']} {row['sites_cpu_ms'][row['largest_site']]:.2f} ms")
    print("\n   where the time goes (CPU ms; GFLOP/s from the cost model's FLOPs of each tower)")
    print(f"   {'config':<15}{'ViT':>8}{'proj':>7}{'LLM':>8}{'lm_head':>8}{'vtdsl':>7}{'rest':>7}"
          f"{'ViT GF/s':>10}{'LLM GF/s':>10}")
    for row in breakdown:
        print(f"   {row['config']:<15}{row['vit_cpu_ms']:>8.1f}{row['projector_cpu_ms']:>7.1f}{row['llm_cpu_ms']:>8.1f}"
              f"{row['lm_head_cpu_ms']:>8.1f}{row['vtdsl_cpu_ms']:>7.1f}{row['rest_cpu_ms']:>7.1f}"
              f"{row['vit_gflop_per_s']:>10.1f}{row['llm_gflop_per_s']:>10.1f}")
    result = {
        "machine": machine,
        "repeats": args.repeats,
        "clock": "cpu (process_time) headline; wall alongside",
        "unpruned_cpu_ms": base_cpu * 1e3,
        "unpruned_wall_ms": base_wall * 1e3,
        "unpruned_cpu_iqr_over_median": C.spread(cpu["unpruned"]),
        "unpruned_wall_iqr_over_median": C.spread(wall["unpruned"]),
        "unpruned_runs_cpu_ms": [x * 1e3 for x in cpu["unpruned"]],
        "unpruned_runs_wall_ms": [x * 1e3 for x in wall["unpruned"]],
        "latency": rows,
        "overhead": overhead,
        "breakdown": breakdown,
        "load_average_after": C.load_average(),
    }
    C.save("prefill", result)
    return result


if __name__ == "__main__":
    main()
