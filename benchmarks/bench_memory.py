"""Peak memory of one prefill, unpruned vs compiled, one subprocess per configuration.

    .venv/bin/python benchmarks/bench_memory.py [--repeats 5]

Issue 8, item 6. tracemalloc does not see torch's allocations, and there is no
`torch.cuda.max_memory_allocated` on the CPU, so two independent measurements are taken,
each in a fresh subprocess per configuration (model built, plan installed, one warm-up
prefill, then the measured prefills):

1. **torch allocator peak** (headline): the prefill runs under
   ``torch.profiler.profile(profile_memory=True)``; c10's CPU allocator then reports every
   allocation and free with the running total of the bytes allocated *inside the profiled
   window* (`total_allocated` of the profiler's allocation events). Its maximum is the
   peak of tensor memory the forward needed on top of the weights and inputs (hidden
   states, attention and MLP intermediates, the pruning's own temporaries, the returned
   logits). Exact and deterministic; it does not count memory allocated outside c10's
   allocator (oneDNN scratch space, Python objects).
2. **RSS high-water mark delta** (cross-check): the kernel's peak resident set (VmHWM) is
   reset by writing ``5`` to ``/proc/self/clear_refs``, the prefill runs, and the peak is
   read back minus the resident set before it. glibc's malloc is run with a fixed
   ``MALLOC_MMAP_THRESHOLD_`` (128 KiB), so every tensor buffer of that size or more is its
   own mmap and returns to the system when freed: RSS then follows live memory instead of
   a heap that only grows. It includes everything the process touches; medians of
   `--repeats` runs.

Configurations: unpruned, VisionZip- and FastV-style policies (as in bench_prefill.py),
and FastV implemented the usual way at 64 tokens (``common-drop-64``, ``common-mask-64``:
benchmarks/fastv_reference.py, eager attention), whose scoring layer materialises the full
``[heads, n, n]`` attention map.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import _common as C

CONFIGS = ["unpruned", "visionzip-192", "visionzip-64", "fastv-192", "fastv-64", "common-drop-64", "common-mask-64"]


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _torch_peak(run) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []

    def walk(e):
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
        for c in e.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        return 0
    events.sort()
    # the reporter's running total can carry bytes from earlier profiling sessions (blocks
    # freed while no profiler was on are never subtracted): measure from this window's start
    base = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - base


def child(config: str, repeats: int, threads: int) -> dict:
    import gc

    import torch

    import vtdsl.compiler as vc

    C.set_threads(threads)
    inputs = C.make_inputs()
    if config.startswith("common-"):  # FastV the usual way (bench_fastv.py), eager attention
        from fastv_reference import CommonFastV

        _, mode, keep = config.split("-")
        model = C.build_model("eager")
        CommonFastV(model, layer=2, keep=int(keep), mode=mode, image_token_id=C.IMAGE_TOKEN)
    else:
        model = C.build_model("sdpa")
        if config != "unpruned":
            vc.compile(C.POLICIES[config], model)

    def run():
        with torch.inference_mode():
            out = model(**inputs, logits_to_keep=1)
        return out

    run()  # warm-up (lazy initialisation, first-touch of code pages)
    rss = []
    for _ in range(repeats):  # before any profiling, which leaves its own garbage behind
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status()["VmRSS"]
        run()
        rss.append(_status()["VmHWM"] - before)
    torch_peaks = [_torch_peak(run) for _ in range(2)]  # deterministic: 2 runs check that
    return {
        "config": config,
        "torch_peak_bytes": C.med(torch_peaks),
        "torch_peaks": torch_peaks,
        "rss_peak_delta_bytes": C.med(rss),
        "rss_deltas": rss,
        "rss_after_bytes": _status()["VmRSS"],
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="*", default=CONFIGS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.repeats, args.threads)))
        return {}

    C.set_threads(args.threads)
    machine = C.header("peak memory of one prefill (subprocess per configuration)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    rows = []
    for config in args.configs:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", config, "--repeats", str(args.repeats),
             "--threads", str(args.threads)],
            capture_output=True, text=True, env=env, check=False,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise SystemExit(f"{config}: child failed\n{proc.stdout}\n{proc.stderr}")
        rows.append(json.loads(line[7:]))
    base = rows[0] if rows and rows[0]["config"] == "unpruned" else None
    print(f"\n   {'config':<15}{'torch peak MiB':>15}{'ratio':>7}{'RSS peak delta MiB':>20}{'ratio':>7}"
          f"{'FLOPs ratio':>12}{'KV ratio':>10}")
    for r in rows:
        if base:
            r["torch_ratio"] = r["torch_peak_bytes"] / base["torch_peak_bytes"]
            r["rss_ratio"] = r["rss_peak_delta_bytes"] / base["rss_peak_delta_bytes"]
        name = "fastv-64" if r["config"].startswith("common-") else r["config"]
        cost = C.ideal(C.POLICIES[name]) if name in C.POLICIES else None
        r["flops_ratio"] = cost["flops_ratio"] if cost else 1.0
        r["kv_ratio"] = cost["kv_ratio"] if cost else 1.0
        print(f"   {r['config']:<15}{r['torch_peak_bytes'] / 2**20:>15.1f}{r.get('torch_ratio', 1):>7.2f}"
              f"{r['rss_peak_delta_bytes'] / 2**20:>20.1f}{r.get('rss_ratio', 1):>7.2f}"
              f"{r['flops_ratio']:>12.3f}{r['kv_ratio']:>10.3f}")
    result = {"machine": machine, "repeats": args.repeats, "malloc_mmap_threshold": 128 * 1024, "rows": rows}
    C.save("memory", result)
    return result


if __name__ == "__main__":
    main()
