"""Compile time and per-image-size re-checks on every registered full-size family (meta).

    .venv/bin/python benchmarks/bench_families.py [--repeats 10] [--sizes 20]

For each model (built once on the meta device, not counted): `vtdsl.compiler.compile(path,
model)` of every zoo policy the model accepts (the refused ones are counted, not timed),
medians of `--repeats` runs. Then the cost of following image sizes at run time: a
compiled model checks its policy once per token layout (`vtdsl.compiler.layouts.PlanCache`);
the time of that first check for `--sizes` distinct image sizes (FastV and VisionZip), and
of a repeat (a cache hit). Wall clock; there is no parallel work.
"""

from __future__ import annotations

import argparse

import _common as C

MODELS = ("llava-1.5-7b", "llava-next-7b", "llava-onevision-qwen2-7b", "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b",
          "internvl3-8b", "gemma-3-4b", "smolvlm-2.2b")


def sizes_for(spec, count: int) -> list[tuple[int, int]]:
    """Distinct image sizes (pixels) with distinct token layouts on `spec` (fewer where the
    family has fewer: Gemma 3 resizes every image to one view)."""
    out, seen = [], set()
    height = 200
    while len(out) < count and height < 4000:
        for width in range(200, 1400, 28):
            layout = spec.for_image(height, width)
            key = (layout.anyres_grid, layout.anyres_map, layout.image_grid)
            if key not in seen:
                seen.add(key)
                out.append((height, width))
            if len(out) == count:
                break
        height += 28
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sizes", type=int, default=20)
    args = parser.parse_args()

    import vtdsl.compiler as vc
    from vtdsl import ir, lang
    from vtdsl.compiler.layouts import PlanCache
    from vtdsl.compiler.text_encoder import clip_text_term
    from vtdsl.lang.errors import PolicyError
    from vtdsl.models import get_spec

    machine = C.header("compile time and per-size re-checks on every family's meta model")
    paths = sorted((C.ROOT / "policies").glob("*.vt"))
    result = {"machine": machine, "repeats": args.repeats, "models": {}}
    for name in MODELS:
        spec = get_spec(name)
        with C.Stopwatch() as sw:
            model = spec.build()
        build_ms = sw.wall * 1e3
        timed, refused = [], []
        for path in paths:
            try:
                plan = ir.check(lang.parse_file(path), spec)
            except PolicyError:
                refused.append(path.name)
                continue
            if clip_text_term(plan) is not None:
                refused.append(path.name)  # recoverable.vt: compiles only with an auxiliary CLIP text encoder
                continue
            runs = []
            for _ in range(args.repeats):
                with C.Stopwatch() as sw:
                    vc.compile(str(path), model)
                runs.append(sw.wall)
                vc.uncompile(model)
            timed.append((path.name, C.med(runs) * 1e3))
        checks = {}
        for policy in ("fastv.vt", "visionzip.vt"):
            try:
                plan = ir.check(lang.parse_file(C.ROOT / "policies" / policy), spec)
            except PolicyError:
                continue
            cache = PlanCache(plan)
            first, again = [], []
            for size in sizes_for(spec, args.sizes):
                with C.Stopwatch() as sw:
                    cache.for_sizes([size])
                first.append(sw.wall)
                with C.Stopwatch() as sw:
                    cache.for_sizes([size])
                again.append(sw.wall)
            checks[policy] = {"first_ms": C.med(first) * 1e3, "first_max_ms": max(first) * 1e3,
                              "repeat_ms": C.med(again) * 1e3}
        compile_ms = [ms for _, ms in timed]
        row = {
            "model_build_ms": build_ms,
            "compiled": len(timed),
            "refused": refused,
            "compile_median_ms": C.med(compile_ms),
            "compile_slowest_ms": max(compile_ms),
            "slowest_policy": max(timed, key=lambda t: t[1])[0],
            "recheck": checks,
        }
        result["models"][name] = row
        print(f"\n   {name}: built in {build_ms:.0f} ms (not counted); {len(timed)} zoo policies compile in "
              f"median {row['compile_median_ms']:.1f} ms, slowest {row['compile_slowest_ms']:.1f} ms "
              f"({row['slowest_policy']}); {len(refused)} refused at check time")
        for policy, c in checks.items():
            print(f"   {policy}: first image of a new token layout {c['first_ms']:.2f} ms (max "
                  f"{c['first_max_ms']:.2f}), same layout again {c['repeat_ms'] * 1e3:.1f} us")
    C.save("families", result)
    return result


if __name__ == "__main__":
    main()
