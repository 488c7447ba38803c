"""Cold start of `vtdsl check` on a built-in model: a fresh interpreter per run.

    .venv/bin/python benchmarks/bench_cold_start.py [--runs 7] [--policy policies/fastv.vt] [--model llava-1.5-7b]

Each run is `vtdsl check POLICY --model MODEL` in a new process (the console script, as a
user types it). Prints the median wall time and the median CPU time (user + sys of the
child, which does not grow while other processes hold the cores), and the modules the
run imported at the top level that cost the most (`python -X importtime`), so a
regression names its import. Issue 21's target: <= 0.5 s wall from a cold start.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VTDSL = Path(sys.executable).with_name("vtdsl")


def one_run(cmd: list[str]) -> tuple[float, float]:
    """(wall, cpu) seconds of one cold process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def heaviest_imports(cmd: list[str], top: int = 6) -> list[tuple[str, float]]:
    """The costliest top-level packages of one run, by cumulative import time (ms)."""
    out = subprocess.run([sys.executable, "-X", "importtime", *cmd], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    rows = []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(2)) <= 2:  # the run's own imports and their direct children
            rows.append((m.group(3), int(m.group(1)) / 1e3))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--policy", default="policies/fastv.vt")
    parser.add_argument("--model", default="llava-1.5-7b")
    args = parser.parse_args()
    cmd = [str(VTDSL), "check", args.policy, "--model", args.model]
    one_run(cmd)  # warm the file cache: "cold" means a new interpreter, not a cold disk
    runs = [one_run(cmd) for _ in range(args.runs)]
    wall = statistics.median(w for w, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    print(f"vtdsl check {args.policy} --model {args.model}: median of {args.runs} cold runs: "
          f"wall {wall:.3f} s, cpu {cpu:.3f} s (load average {os.getloadavg()[0]:.1f})")
    script = [str(VTDSL), "check", args.policy, "--model", args.model]
    for name, ms in heaviest_imports(script):
        print(f"  import {name:<28} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
