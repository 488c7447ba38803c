"""The GPU benchmark: llava-1.5-7b (random weights, no download) in bf16 with sdpa on CUDA.

    python benchmarks/gpu.py [--out benchmarks/results/gpu] [--profile h100] [--compile]
    python benchmarks/gpu.py --tiny --out /tmp/gpu-smoke      # CPU smoke run (the test suite's)

For the unpruned model and the zoo at 64 / 128 / 192 tokens, at batch 1 and 8 with a
576-image + 64-text-token prompt and 64 generated tokens (greedy, all 64 forced):
prefill latency, decode latency per token, their measured speedups, the FLOPs-ideal
prefill speedup (cost model), the speedups the latency model predicts for the device
profile (`vtdsl check --device`), and the peak memory. FastV is also run the usual way
(eager attention weights at layer K-1, dropped tokens masked out of every later layer:
benchmarks/fastv_reference.py) for comparison. With `--compile`, the unpruned model, a
ViT-pruned (visionzip-64) and an LLM-pruned policy (fastv) are also timed with their
layers compiled (`vtdsl.compiler.compile_regions`, docs/compiler.md "torch.compile":
prefill and decode), after a compile warm-up that is reported separately, with whether
the greedy tokens match eager's and dynamo's graph, recompile and graph-break counts.

Writes `gpu.json` and `gpu.md` into --out. Sized to finish in under 8 minutes on one
H100/H200-class GPU. `--tiny` runs the same code on tiny-llava (float32, CPU, 2 policies,
4 new tokens) to prove the script works; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

ZOO = {  # policy file -> visual tokens it hands the LLM (64 / 128 / 192 settings)
    "visionzip-64.vt": 64, "visionzip-128.vt": 128, "visionzip.vt": 192,
    "pdrop-64.vt": 64, "pdrop-128.vt": 128, "pdrop-192.vt": 192,
    "sparsevlm-64.vt": 64, "sparsevlm-128.vt": 128, "sparsevlm.vt": 192,
    "holov.vt": 64, "holov-128.vt": 128, "holov-192.vt": 192,
    "dart-64.vt": 64, "dart.vt": 128, "dart-192.vt": 192,
    "random-64.vt": 64, "random-128.vt": 128, "random-192.vt": 192,
}
TINY_ZOO = {"visionzip-64.vt": 64, "dart-64.vt": 64}
TEXT_BEFORE, TEXT_AFTER = 5, 59  # 64 text tokens around the 576 image placeholders
FASTV_LAYER, FASTV_KEEP = 2, 64


class Clock:
    """Seconds of a callable, synchronising the device around it."""

    def __init__(self, device, warmup: bool = True):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.warmup = warmup

    def __call__(self, fn, repeats: int) -> float:
        if self.warmup:  # kernel selection, allocator growth, lazy inits
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def make_inputs(spec, batch: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    high = min(1000, spec.image_token_id)  # ordinary text ids, below the image placeholder
    before = torch.randint(1, high, (batch, TEXT_BEFORE), generator=g)
    after = torch.randint(1, high, (batch, TEXT_AFTER), generator=g)
    image = torch.full((batch, spec.image_tokens), spec.image_token_id, dtype=torch.long)
    ids = torch.cat([before, image, after], 1)
    pixels = torch.randn(batch, spec.channels, spec.image_size, spec.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)}


def measure(model, inputs, new_tokens: int, clock: Clock, repeats: int) -> dict:
    """Prefill seconds (one forward, last-position logits); decode seconds per token, as
    (generate N tokens - generate 1 token) / (N - 1), so the prefill cancels out; peak bytes."""
    import torch

    def prefill():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    def generate(n: int):
        def run():
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return run

    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_prefill = clock(prefill, repeats)
    t_one = clock(generate(1), repeats)
    t_all = clock(generate(new_tokens), max(1, repeats // 2))
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"prefill_ms": 1e3 * t_prefill, "decode_ms_per_token": 1e3 * max(t_all - t_one, 1e-9) / (new_tokens - 1),
            "peak_memory_bytes": peak}


def predicted(policy_file: str | None, spec, profile, batch: int, new_tokens: int) -> dict:
    import vtdsl
    from vtdsl.cost import estimate
    from vtdsl.cost.latency import predict

    source = ROOT / "policies" / policy_file if policy_file else ""
    plan = vtdsl.check(source, spec)
    report = estimate(plan, text_tokens=TEXT_BEFORE + TEXT_AFTER, decode_context=new_tokens // 2)
    lat = predict(report, profile, batch=batch, dtype="bfloat16" if spec.dtype != "float32" else "float32")
    return {"flops_ideal_speedup": 1 / report.flops_ratio, "predicted_prefill_speedup": lat.prefill_speedup,
            "predicted_decode_speedup": lat.decode_speedup, "predicted_prefill_bound": lat.policy_prefill.bound,
            "predicted_decode_bound": lat.policy_decode.bound}


def usual_fastv(spec, seed: int, device, dtype, inputs, clock: Clock, repeats: int) -> dict:
    """FastV the usual way: an eager model, attention weights at layer K-1, masking (batch 1)."""
    import torch

    from fastv_reference import CommonFastV

    eager = spec.build(device=device, dtype=dtype, seed=seed, attn_implementation="eager")
    one = {k: v[:1] for k, v in inputs.items()}
    fastv = CommonFastV(eager, layer=FASTV_LAYER, keep=FASTV_KEEP, mode="mask", image_token_id=spec.image_token_id)
    try:
        def prefill():
            with torch.inference_mode():
                eager(**one, logits_to_keep=1)

        ms = 1e3 * clock(prefill, repeats)
    finally:
        fastv.remove()
    del eager
    return {"prefill_ms": ms}


def run(args) -> dict:
    import torch

    import vtdsl.compiler as vc
    from vtdsl.cost.devices import get_device
    from vtdsl.models import get_spec

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
    spec = get_spec("tiny-llava" if args.tiny else "llava-1.5-7b")
    dtype = "float32" if args.tiny else "bfloat16"
    zoo = TINY_ZOO if args.tiny else ZOO
    batches = (1, 2) if args.tiny else (1, 8)
    new_tokens = 4 if args.tiny else 64
    profile = get_device(args.profile or ("h100" if args.tiny else _profile_of(torch.cuda.get_device_name())))
    clock = Clock(device, warmup=not args.tiny)
    started = time.perf_counter()
    model = spec.build(device=device, dtype=dtype, seed=0, attn_implementation="sdpa")
    rows = []
    for batch in batches:
        inputs = make_inputs(spec, batch, device)
        base = measure(model, inputs, new_tokens, clock, args.repeats)
        rows.append({"config": "unpruned", "tokens": spec.image_tokens, "batch": batch, **base,
                     **predicted(None, spec, profile, batch, new_tokens)})
        for policy, tokens in zoo.items():
            with vc.apply(str(ROOT / "policies" / policy), model, spec=spec):
                m = measure(model, inputs, new_tokens, clock, args.repeats)
            rows.append({"config": policy.removesuffix(".vt"), "tokens": tokens, "batch": batch, **m,
                         "prefill_speedup": base["prefill_ms"] / m["prefill_ms"],
                         "decode_speedup": base["decode_ms_per_token"] / m["decode_ms_per_token"],
                         **predicted(policy, spec, profile, batch, new_tokens)})
            print(f"[{time.perf_counter() - started:6.1f}s] batch {batch} {policy}: "
                  f"{rows[-1]['prefill_speedup']:.2f}x prefill", file=sys.stderr)
        if batch == 1:
            fastv = usual_fastv(spec, 0, device, dtype, inputs, clock, args.repeats)
            rows.append({"config": f"usual-fastv-mask-{FASTV_KEEP}", "tokens": FASTV_KEEP, "batch": 1, **fastv,
                         "prefill_speedup": base["prefill_ms"] / fastv["prefill_ms"]})
    compiled = compile_rows(model, spec, device, new_tokens, clock, args) if args.compile else []
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (--tiny smoke run)",
            "profile": profile.name, "model": spec.name, "dtype": dtype, "new_tokens": new_tokens,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows, "torch_compile": compiled,
            "seconds": time.perf_counter() - started}


def compile_rows(model, spec, device, new_tokens: int, clock: Clock, args) -> list[dict]:
    """Eager vs torch.compile of the layers (`vtdsl.compiler.compile_regions`, default mode;
    aot_eager on the --tiny CPU run, where inductor's code generation takes minutes) for the
    unpruned model, visionzip-64 and fastv, batch 1. The warm-up is a short generate, so it
    compiles the prefill and the decode steps; what dynamo did is counted with its counters."""
    import torch
    from torch._dynamo.utils import counters

    import vtdsl.compiler as vc

    backend = "aot_eager" if args.tiny else "inductor"
    inputs = make_inputs(spec, 1, device)
    out = []
    for policy in (None, "visionzip-64.vt", "fastv.vt"):
        with (vc.apply(str(ROOT / "policies" / policy), model, spec=spec) if policy else _nothing()):
            eager = measure(model, inputs, new_tokens, clock, args.repeats)
            eager_ids = _greedy(model, inputs, 8)
            torch._dynamo.reset()
            counters.clear()
            vc.compile_regions(model, backend=backend)
            try:
                start = time.perf_counter()
                compiled_ids = _greedy(model, inputs, 8)
                warmup = time.perf_counter() - start
                fast = measure(model, inputs, new_tokens, clock, args.repeats)
            finally:
                vc.uncompile_regions(model)
        out.append({"config": policy.removesuffix(".vt") if policy else "unpruned", "backend": backend,
                    "eager_prefill_ms": eager["prefill_ms"], "compiled_prefill_ms": fast["prefill_ms"],
                    "eager_decode_ms": eager["decode_ms_per_token"], "compiled_decode_ms": fast["decode_ms_per_token"],
                    "compile_warmup_s": warmup, "same_tokens": bool(torch.equal(eager_ids, compiled_ids)),
                    "graphs": counters["stats"]["unique_graphs"], "recompiles": _recompiles(),
                    "graph_breaks": sum(counters["graph_break"].values())})
    torch._dynamo.reset()
    return out


def _greedy(model, inputs, n: int):
    import torch

    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _recompiles() -> int:
    """Compiled entries beyond the first, over every code dynamo recompiled."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import guard_failures

    return sum(len(_debug_get_cache_entry_list(code)) - 1 for code in guard_failures)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _profile_of(gpu_name: str) -> str:
    name = gpu_name.lower().replace(" ", "")
    for key in ("h200", "h100", "a100", "l40s", "4090"):
        if key in name:
            return "rtx4090" if key == "4090" else key
    return "h100"


def markdown(result: dict) -> str:
    lines = [f"GPU benchmark, {result['date']}: {result['device']} ({result['model']}, {result['dtype']}, "
             f"sdpa, 576 + 64 prompt tokens, {result['new_tokens']} new tokens); latency model profile "
             f"'{result['profile']}'; {result['seconds']:.0f} s in all.", "",
             "| config | tokens | batch | prefill ms | decode ms/token | prefill speedup | FLOPs-ideal | "
             "predicted prefill | decode speedup | predicted decode | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x, spec=".2f"):
        return "—" if x is None else format(x, spec)

    for r in result["rows"]:
        peak = r.get("peak_memory_bytes")
        lines.append(f"| {r['config']} | {r['tokens']} | {r['batch']} | {f(r['prefill_ms'], '.1f')} | "
                     f"{f(r.get('decode_ms_per_token'), '.2f')} | {f(r.get('prefill_speedup'))} | "
                     f"{f(r.get('flops_ideal_speedup'))} | {f(r.get('predicted_prefill_speedup'))} | "
                     f"{f(r.get('decode_speedup'))} | {f(r.get('predicted_decode_speedup'))} | "
                     f"{f(peak / 2**30 if peak else None)} |")
    if result["torch_compile"]:
        lines += ["", "| config | backend | eager prefill ms | compiled prefill ms | eager decode ms | "
                  "compiled decode ms | compile warm-up s | same tokens | graphs | recompiles | graph breaks |",
                  "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in result["torch_compile"]:
            lines.append(f"| {r['config']} | {r['backend']} | {r['eager_prefill_ms']:.1f} | "
                         f"{r['compiled_prefill_ms']:.1f} | {r['eager_decode_ms']:.2f} | {r['compiled_decode_ms']:.2f} | "
                         f"{r['compile_warmup_s']:.1f} | {'yes' if r['same_tokens'] else 'no'} | {r['graphs']} | "
                         f"{r['recompiles']} | {r['graph_breaks']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument("--profile", help="latency-model device profile (default: from the GPU's name)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (adds compile warm-ups)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny-llava")
    args = parser.parse_args(argv)
    if args.tiny:
        args.repeats = 1
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
