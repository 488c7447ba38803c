"""Compile time of the zoo policies on meta llava-1.5-7b, and cost evaluations per second.

    .venv/bin/python benchmarks/bench_compile.py [--repeats 10] [--seconds 1]

Issue 8, item 5. The model is built once on the meta device (``get_spec("llava-1.5-7b")
.build()``: module setup only; its time is reported, not counted). For every policy in
policies/*.vt, `vtdsl.compiler.compile(path, model)` is timed from the file path to the
installed model (read, parse, check against the model's spec, fx-trace the vision encoder,
register hooks), then undone with `uncompile` (timed separately). The first compile in the
process (lazy imports: the grammar, torch.fx) is reported as "cold". Medians of
`--repeats` runs per policy; wall clock (there is no parallel work).

Cost evaluations per second: `benchmarks/bench_cost.py`'s hand-built three-stage plan and
the checked plan of every zoo policy, through `vtdsl.cost.estimate`.
"""

from __future__ import annotations

import argparse

import _common as C


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per cost-rate measurement")
    args = parser.parse_args()

    import vtdsl.compiler as vc
    from vtdsl import ir, lang
    from vtdsl.cost import estimate
    from vtdsl.models import get_spec

    machine = C.header("compile time (meta llava-1.5-7b) and cost-model throughput")
    with C.Stopwatch() as sw:
        spec = get_spec("llava-1.5-7b")
        model = spec.build()  # meta
    build_ms = sw.wall * 1e3
    paths = sorted((C.ROOT / "policies").glob("*.vt"))

    with C.Stopwatch() as sw:
        vc.compile(str(paths[0]), model)
    cold_ms = sw.wall * 1e3
    vc.uncompile(model)

    rows = []
    for path in paths:
        comp, undo, check = [], [], []
        for _ in range(args.repeats):
            with C.Stopwatch() as sw:
                policy = lang.parse_file(path)
                ir.check(policy, spec)
            check.append(sw.wall)
            with C.Stopwatch() as sw:
                vc.compile(str(path), model)
            comp.append(sw.wall)
            with C.Stopwatch() as sw:
                vc.uncompile(model)
            undo.append(sw.wall)
        handle_mech = None
        vc.compile(str(path), model)
        handle_mech = dict(vc.compiled(model).listing.mechanism)
        vc.uncompile(model)
        rows.append({
            "policy": path.name,
            "compile_ms": C.med(comp) * 1e3,
            "compile_max_ms": max(comp) * 1e3,
            "parse_check_ms": C.med(check) * 1e3,
            "uncompile_ms": C.med(undo) * 1e3,
            "mechanism": handle_mech,
        })
    rows.sort(key=lambda r: -r["compile_ms"])
    print(f"\n   model construction (meta, not counted): {build_ms:.0f} ms; first compile in the process "
          f"(cold): {cold_ms:.1f} ms")
    print(f"   {'policy':<20}{'compile ms':>11}{'max':>7}{'parse+check':>12}{'install':>9}{'uncompile':>10}   towers")
    for r in rows[:6] + [r for r in rows if r["policy"] in ("fastv.vt", "visionzip-64.vt")]:
        mech = ",".join(f"{k}:{v}" for k, v in r["mechanism"].items())
        print(f"   {r['policy']:<20}{r['compile_ms']:>11.2f}{r['compile_max_ms']:>7.1f}{r['parse_check_ms']:>12.2f}"
              f"{r['compile_ms'] - r['parse_check_ms']:>9.2f}{r['uncompile_ms']:>10.2f}   {mech}")
    all_med = [r["compile_ms"] for r in rows]
    print(f"   all {len(rows)} zoo policies: median {C.med(all_med):.2f} ms, slowest {max(all_med):.2f} ms "
          f"(target <= 50 ms)")

    # ------------------------------------------------------------ cost evals/sec
    sys_path = str(C.ROOT / "benchmarks")
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    import bench_cost

    hand = bench_cost.make_plan()
    hand_rate = bench_cost.rate(lambda: estimate(hand), args.seconds)
    zoo_plans = [ir.check(lang.parse_file(p), spec) for p in paths]

    def all_zoo():
        for plan in zoo_plans:
            estimate(plan)

    zoo_rate = bench_cost.rate(all_zoo, args.seconds / 2) * len(zoo_plans)
    print(f"\n   cost model: estimate(plan) {hand_rate:,.0f} evals/s (bench_cost.py's plan); "
          f"{zoo_rate:,.0f} evals/s over the {len(zoo_plans)} zoo plans (target >= 10,000)")
    result = {
        "machine": machine,
        "repeats": args.repeats,
        "model_build_ms": build_ms,
        "cold_compile_ms": cold_ms,
        "compile": rows,
        "compile_median_ms": C.med(all_med),
        "compile_slowest_ms": max(all_med),
        "cost_evals_per_s": hand_rate,
        "cost_evals_per_s_zoo": zoo_rate,
    }
    C.save("compile", result)
    return result


if __name__ == "__main__":
    main()
