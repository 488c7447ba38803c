"""Decode after pruning: per-token latency and KV-cache bytes, 32 generated tokens.

    .venv/bin/python benchmarks/bench_decode.py [--repeats 5] [--tokens 32] [--threads 1]

Issue 8, item 4. ``model.generate(max_new_tokens=32, min_new_tokens=32, do_sample=False)``
on the benchmark model, unpruned and compiled. Every forward generate makes is timed
(pre/post hooks on the top-level model, CPU and wall clock); the first is the prefill, the
other 31 are decode steps: their median is the per-token latency (generate encodes the
image before its first forward, so that forward is the LLM prefill alone; the whole
generate call is reported too). KV-cache bytes are
summed over the keys and values of every layer of the returned `DynamicCache` and checked
against the cost model (prefill KV bytes + one token per layer per decode step).

With LLM pruning the layers after the cut keep shorter caches, so each decode step reads
fewer keys; with pruning at ``vit.out`` every layer's cache is shorter. At these sizes a
decode step reads all the weights once (64 M parameters, memory-bound) and attends to at
most ~700 cached tokens, so pruning changes its latency little; the KV bytes follow the
token counts exactly.
"""

from __future__ import annotations

import argparse

import _common as C

CONFIGS = ["visionzip-64", "fastv-64", "fastv-192"]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policies", nargs="*", default=CONFIGS)
    args = parser.parse_args()

    import torch

    import vtdsl.compiler as vc
    from vtdsl.cost import estimate

    C.set_threads(args.threads)
    machine = C.header(f"decode: {args.tokens} generated tokens")
    model = C.build_model("sdpa")
    inputs = C.make_inputs()
    plans = {name: vc.resolve_plan(C.POLICIES[name], model) for name in args.policies}
    spec = C.bench_spec()

    steps: list[tuple[float, float]] = []
    clock = {}

    def pre(module, args_, kwargs):
        clock["w"], clock["c"] = C.time.perf_counter(), C.time.process_time()

    def post(module, args_, output):
        steps.append((C.time.process_time() - clock["c"], C.time.perf_counter() - clock["w"]))

    model.register_forward_pre_hook(pre, with_kwargs=True, prepend=True)
    model.register_forward_hook(post)

    def generate():
        steps.clear()
        with torch.inference_mode(), C.Stopwatch() as total:
            out = model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                 return_dict_in_generate=True)
        cache = out.get("cache") or out.get("past_key_values")
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        return list(steps), kv, lengths, total

    def run(plan):
        def fn():
            if plan is None:
                return generate()
            vc.compile(plan, model)
            try:
                return generate()
            finally:
                vc.uncompile(model)

        return fn

    fns = {"unpruned": run(None), **{k: run(p) for k, p in plans.items()}}
    for fn in fns.values():
        fn()
    got = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            C.gc.collect()
            got[k].append(fn())

    decode_steps = args.tokens - 1
    rows = []
    print(f"\n   {'config':<14}{'generate ms':>12}{'1st fwd ms':>11}{'decode ms/tok':>14}{'IQR':>7}{'wall':>8}{'speedup':>9}"
          f"{'KV MiB':>8}{'KV ratio':>9}{'model':>7}{'decode FLOPs':>13}   cache lengths per layer")
    base = None
    for k, runs in got.items():
        step_cpu = [C.med([s[0] for s in r[0][1:]]) for r in runs]  # per run: median decode step
        step_wall = [C.med([s[1] for s in r[0][1:]]) for r in runs]
        prefill = C.med([r[0][0][0] for r in runs])
        gen_total = C.med([r[3].cpu for r in runs])
        kv, lengths = runs[-1][1], runs[-1][2]
        assert all(len(r[0]) == args.tokens for r in runs), "generate made an unexpected number of forwards"
        source = C.POLICIES.get(k, "at llm.layer2 keep text top 100%")
        report = estimate(C.check_policy(source), text_tokens=C.TEXT_TOKENS, logits="last")
        expected_kv = (report.policy.kv_bytes if k != "unpruned" else report.baseline.kv_bytes)
        # + each decode step appends one token to every layer (float32 cache, cost model dtype)
        expected_kv += decode_steps * spec.llm.layers * 2 * spec.llm.kv_heads * spec.llm.head_dim * spec.dtype_bytes
        assert kv == expected_kv, f"{k}: KV cache holds {kv} bytes, the cost model says {expected_kv}"
        decode_flops = report.policy.decode if k != "unpruned" else report.baseline.decode
        row = {
            "config": k,
            "first_forward_cpu_ms": prefill * 1e3,
            "generate_cpu_ms": gen_total * 1e3,
            "decode_cpu_ms_per_token": C.med(step_cpu) * 1e3,
            "decode_cpu_iqr_over_median": C.spread(step_cpu),
            "decode_wall_ms_per_token": C.med(step_wall) * 1e3,
            "kv_bytes": kv,
            "kv_bytes_cost_model": expected_kv,
            "cache_lengths": lengths,
            "decode_flops_cost_model": decode_flops,
            "runs_decode_cpu_ms": [x * 1e3 for x in step_cpu],
        }
        if base is None:
            base = row
        row["decode_speedup"] = base["decode_cpu_ms_per_token"] / row["decode_cpu_ms_per_token"]
        row["kv_ratio"] = kv / base["kv_bytes"]
        row["decode_flops_ratio"] = decode_flops / base["decode_flops_cost_model"]
        rows.append(row)
        print(f"   {k:<14}{row['generate_cpu_ms']:>12.1f}{row['first_forward_cpu_ms']:>11.1f}"
              f"{row['decode_cpu_ms_per_token']:>14.2f}"
              f"{row['decode_cpu_iqr_over_median']:>7.1%}{row['decode_wall_ms_per_token']:>8.2f}"
              f"{row['decode_speedup']:>9.2f}{kv / 2**20:>8.2f}{row['kv_ratio']:>9.3f}{'ok':>7}"
              f"{row['decode_flops_ratio']:>13.3f}   {lengths}")
    print("   (KV bytes equal the cost model's prefill KV + one token per layer per decode step: 'ok'.")
    print("    generate encodes the image before its first forward, so '1st fwd' is the LLM prefill only;")
    print("    'generate' is the whole call: ViT + prefill + 31 decode steps.)")
    result = {"machine": machine, "repeats": args.repeats, "tokens": args.tokens, "rows": rows,
              "load_average_after": C.load_average()}
    C.save("decode", result)
    return result


if __name__ == "__main__":
    main()
