"""Compiled FastV vs FastV implemented the usual way, at equal kept tokens.

    .venv/bin/python benchmarks/bench_fastv.py [--repeats 7] [--keep 64 288] [--threads 1]

Issue 8, item 3. `at llm.layer2 keep text top N` compiled by vtdsl (sdpa attention
everywhere; the score is one attention row recomputed from layer 1's captured q/k) against
benchmarks/fastv_reference.py: the usual implementation with eager attention and
``output_attentions`` at layer 1, then FastV's two modes, cutting the sequence ("drop",
FastV inplace) or masking the dropped tokens ("mask", FastV's default), plus the most
favourable variant ("hybrid": sdpa model, only layer 1 eager). Same weights, same prompt.

Before timing, the script asserts that every implementation keeps the same image
positions and that the last-position logits agree (``allclose(atol=1e-4, rtol=1e-4)``:
eager and sdpa attention round differently), and prints the largest difference.
Timing as in bench_prefill.py: interleaved rounds, CPU-time medians (wall alongside).
"""

from __future__ import annotations

import argparse

import _common as C


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", type=int, nargs="*", default=[64, 288])
    parser.add_argument("--layer", type=int, default=2)
    args = parser.parse_args()

    import torch

    import vtdsl.compiler as vc
    from fastv_reference import CommonFastV

    C.set_threads(args.threads)
    machine = C.header("FastV: compiled vs the usual way")
    sdpa = C.build_model("sdpa")
    eager = C.build_model("eager")
    sd_a, sd_b = sdpa.state_dict(), eager.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), "the two models must share weights"
    inputs = C.make_inputs()
    K = args.layer

    def prefill(model):
        with torch.inference_mode():
            return model(**inputs, logits_to_keep=1)

    def compiled(n):
        plan = vc.resolve_plan(f"at llm.layer{K} keep text top {n}", sdpa)

        def run(check=False):
            vc.compile(plan, sdpa)
            try:
                with C.Stopwatch() as sw:
                    out = prefill(sdpa)
                if check:
                    return out.logits[0, -1], vc.kept_tokens(sdpa)[f"llm.layer{K}#0"][0]
                return sw
            finally:
                vc.uncompile(sdpa)

        return run

    def common(n, mode):
        model = sdpa if mode == "hybrid" else eager

        def run(check=False):
            ref = CommonFastV(model, layer=K, keep=n, mode=mode, image_token_id=C.IMAGE_TOKEN)
            try:
                with C.Stopwatch() as sw:
                    out = prefill(model)
                if check:
                    return out.logits[0, -1], ref.kept
                return sw
            finally:
                ref.remove()

        return run

    def plain(model):
        def run(check=False):
            with C.Stopwatch() as sw:
                prefill(model)
            return sw

        return run

    fns = {"unpruned-sdpa": plain(sdpa), "unpruned-eager": plain(eager)}
    checks = {}
    for n in args.keep:
        impls = {
            f"vtdsl-{n}": compiled(n),
            f"common-drop-{n}": common(n, "drop"),
            f"common-mask-{n}": common(n, "mask"),
            f"hybrid-drop-{n}": common(n, "hybrid"),
        }
        # ---------------------------------------------------------- equal outputs
        outs = {k: fn(check=True) for k, fn in impls.items()}
        logits0, kept0 = outs[f"vtdsl-{n}"]
        check = {"kept_equal": {}, "max_abs_logit_diff": {}}
        for k, (logits, kept) in outs.items():
            same = torch.equal(kept0, kept)
            diff = (logits - logits0).abs().max().item()
            assert same, f"{k} keeps other image positions than vtdsl-{n}"
            assert torch.allclose(logits, logits0, atol=1e-4, rtol=1e-4), f"{k}: logits differ by {diff:.3g}"
            check["kept_equal"][k] = same
            check["max_abs_logit_diff"][k] = diff
        print(f"   keep {n}: all implementations keep the same {kept0.numel()} image positions; "
              f"last-position logits agree (max |diff| {max(check['max_abs_logit_diff'].values()):.2e})")
        checks[n] = check
        fns.update(impls)

    # -------------------------------------------------------------- timing
    cpu, wall = C.interleaved(fns, args.repeats)
    med = {k: C.med(v) for k, v in cpu.items()}
    medw = {k: C.med(v) for k, v in wall.items()}
    print(f"\n   {'implementation':<20}{'cpu ms':>9}{'IQR':>7}{'wall ms':>9}   vtdsl speedup (cpu, paired, wall)")
    rows = []
    for k in fns:
        n = k.rsplit("-", 1)[1]
        ours = f"vtdsl-{n}"
        line = f"   {k:<20}{med[k] * 1e3:>9.1f}{C.spread(cpu[k]):>7.1%}{medw[k] * 1e3:>9.1f}"
        row = {"implementation": k, "cpu_ms": med[k] * 1e3, "cpu_iqr_over_median": C.spread(cpu[k]),
               "wall_ms": medw[k] * 1e3, "runs_cpu_ms": [x * 1e3 for x in cpu[k]]}
        if ours in med and k != ours:
            row["vtdsl_speedup"] = med[k] / med[ours]
            row["vtdsl_speedup_paired"] = C.paired_ratio(cpu[k], cpu[ours])
            row["vtdsl_speedup_wall"] = medw[k] / medw[ours]
            line += f"   {row['vtdsl_speedup']:.2f}x  {row['vtdsl_speedup_paired']:.2f}x  {row['vtdsl_speedup_wall']:.2f}x"
        rows.append(row)
        print(line)
    result = {"machine": machine, "repeats": args.repeats, "layer": K, "checks": checks, "rows": rows,
              "load_average_after": C.load_average()}
    C.save("fastv", result)
    return result


if __name__ == "__main__":
    main()
