"""vtbench calibration: does the tiny model rank the zoo as LLaVA-1.5-7B does? (issue 22)

    .venv/bin/python benchmarks/bench_calibration.py [--model tiny-llava-vtbench2] [--n 2000]

Every zoo image method at 192 / 128 / 64 visual tokens (FastV and PruMerge through count
variants) on the first N test examples, with paired-bootstrap 95 % intervals
(`vtdsl.eval.calibration`); Spearman's rho against HoloV's Table 1 per budget; the
qualitative checks. Writes benchmarks/results/calibration-MODEL.json and prints the
markdown tables docs/vtbench.md carries.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import _common as C


def markdown(report: dict) -> str:
    """The retention table (method x budget) and the correlation table."""
    from vtdsl.eval.calibration import BUDGETS, PUBLISHED

    cells: dict[str, dict] = {}
    for row in report["rows"]:
        lo, hi = row["interval"]
        text = f"{100 * row['retention']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
        key = row["budget"] if row["budget"] is not None else row["label"]
        cells.setdefault(row["method"], {})[key] = text + ("" if row["budget"] is not None else f" ({row['label']})")
    lines = [f"{report['model']}: {report['examples']} {report['split']} examples, unpruned accuracy "
             f"{100 * report['unpruned']['accuracy']:.1f} %; retention % [95 % interval], published in brackets "
             "where HoloV's Table 1 has it", "",
             "| method | 192 | 128 | 64 | its paper's setting |", "|---|---|---|---|---|"]
    for method in sorted(cells):
        row = [cells[method].get(b, "") + (f" ({PUBLISHED[method][b]})" if b in PUBLISHED.get(method, {}) else "")
               for b in BUDGETS]
        other = "; ".join(v for k, v in cells[method].items() if not isinstance(k, int))
        lines.append(f"| {method} | " + " | ".join(row) + f" | {other} |")
    lines += ["", "| budget | methods | Spearman rho | 95 % interval |", "|---|---:|---:|---|"]
    for budget, c in report["correlations"].items():
        lo, hi = c["interval"]
        lines.append(f"| {budget} | {len(c['methods'])} | {c['spearman']:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llava-vtbench2")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--split", default="test")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    from vtdsl.eval.calibration import calibrate

    torch.set_num_threads(args.threads)
    t0 = time.time()
    report = calibrate(args.model, n=args.n, split=args.split, policies=C.ROOT / "policies",
                       resamples=args.resamples)
    report["seconds"] = round(time.time() - t0, 1)
    report["machine"] = C.machine()
    name = os.path.basename(os.path.normpath(args.model))
    out = args.out or C.RESULTS / f"calibration-{name}.json"
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(markdown(report))
    print(json.dumps(report["checks"], indent=1))
    print(f"wrote {out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
