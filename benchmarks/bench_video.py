"""Video prefill: a 16-frame clip on a Qwen2.5-VL-shaped model, unpruned vs temporal policies.

    .venv/bin/python benchmarks/bench_video.py [--repeats 7] [--threads 1]

Issue 20's performance target: on the benchmark model with a 16-frame clip, a
temporal-merge policy's prefill speedup >= 0.9 x its FLOPs-ideal speedup, and vtdsl's
scoring share <= 3 %.

The video benchmark model is Qwen2.5-VL-7B's config (`vtdsl.models.builtins.QWEN25_VL_7B`:
patch 14, temporal patch 2, 2x2 merger, 112-pixel attention windows with full attention in
every fourth block, M-RoPE, the checkpoint's video pixel range) with widths and depths cut
(ViT 128 wide x 4 blocks, LLM 384 wide x 4 layers, 6 heads of 64 with 2 KV heads) and
float32, built through `vtdsl.models.spec_from_config`, so the cost model sees exactly this
architecture. Token counts are the real model's: 16 frames of 448x448 -> 8 temporal groups
of 32x32 patches (8192 ViT tokens, full attention within a group in the full blocks) ->
8 x 256 = 2048 merged video tokens, in a prompt with 64 text tokens (vision start/end
included). Each prefill is one forward (`logits_to_keep=1`: ViT, merger, LLM, last-position
logits). Policies (LLM stages; the ViT is not pruned by any of them):

- `dycoke-ttm`: policies/dycoke.vt's temporal token merging alone (`merge static 70% per
  window 4`; the decode-time stage plays no part in a prefill),
- `evs`: policies/evs.vt (`keep temporal top 25%` entering the LLM),
- `fastv-per-frame`: a `per frame` keep, FastV-style (`text top 25% per frame` entering
  layer 2: each temporal group keeps its quarter by the last text row's attention).

Timing as bench_prefill.py: one warm-up per configuration, then `--repeats` interleaved
rounds (the plan installed before and removed after each timed call, installing not timed);
process CPU time is the headline with one torch thread, wall clock alongside; speedup =
median(unpruned) / median(policy); efficiency = speedup / FLOPs-ideal speedup (cost model,
`estimate` on `spec.for_video(16, 448, 448)`, 64 text tokens, last-position logits). A
second, instrumented pass (benchmarks/hooktimer.py) gives vtdsl's hook share and its
"score + select" share (score functions, the count rule, the selection, the gather / merge),
and splits the forward into ViT, LLM and lm_head.
"""

from __future__ import annotations

import copy

import _common as C
from hooktimer import HookTimer, PartTimer

FRAMES, HEIGHT, WIDTH = 16, 448, 448
GROUPS, GRID = 8, 32  # temporal groups of 2 frames; patches per side of a 448-pixel frame
VIDEO_TOKENS = GROUPS * (GRID // 2) ** 2  # 2048 after the 2x2 merger
TEXT_BEFORE, TEXT_AFTER = 5, 59  # vision start closes the first, vision end opens the second
VIT = dict(depth=4, hidden_size=128, intermediate_size=342, num_heads=2, fullatt_block_indexes=[3])
LLM = dict(hidden_size=384, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2)
# head dim 64 instead of 128: the real M-RoPE sections [16, 24, 24] halved
MROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}

POLICIES = {
    "dycoke-ttm": "at llm.layer0 merge static 70% per window 4",
    "evs": "at llm.layer0 keep temporal top 25%",
    "fastv-per-frame": "at llm.layer2 keep text top 25% per frame",
}
TARGET = "dycoke-ttm"  # the temporal-merge policy the target names


class QwenParts(PartTimer):
    PARTS = {"vit": "model.visual", "llm": "model.language_model", "lm_head": "lm_head"}


def video_spec_model():
    """(spec, spec for the 16-frame clip) of the video benchmark model."""
    from vtdsl.models import spec_from_config
    from vtdsl.models.builtins import QWEN25_VL_7B

    config = copy.deepcopy(QWEN25_VL_7B)
    config["torch_dtype"] = "float32"
    config["vision_config"].update(VIT, out_hidden_size=LLM["hidden_size"])
    config["text_config"].update(LLM, rope_parameters=MROPE, torch_dtype="float32")
    spec = spec_from_config(config, name="bench-qwen2.5-vl",
                            description="qwen2.5-vl-7b geometry, ViT 128x4, LLM 384x4 (video benchmark)")
    clip = spec.for_video(FRAMES, HEIGHT, WIDTH)
    assert clip.image_tokens == VIDEO_TOKENS, clip.image_tokens
    return spec, clip


def make_inputs(spec, seed: int = 0) -> dict:
    import torch

    cfg = spec.config()
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, 150000, (TEXT_BEFORE + TEXT_AFTER,), generator=g)
    text[TEXT_BEFORE - 1], text[TEXT_BEFORE] = cfg.vision_start_token_id, cfg.vision_end_token_id
    video = torch.full((VIDEO_TOKENS,), cfg.video_token_id)
    ids = torch.cat([text[:TEXT_BEFORE], video, text[TEXT_BEFORE:]])[None]
    patch = 3 * spec.temporal_patch * spec.patch_size ** 2
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values_videos=torch.randn(GROUPS * GRID * GRID, patch, generator=g),
                video_grid_thw=torch.tensor([[GROUPS, GRID, GRID]]),
                mm_token_type_ids=(ids == cfg.video_token_id).int() * 2)


def ideal(clip, source: str) -> dict:
    from vtdsl.cost import estimate
    from vtdsl.ir import check

    report = estimate(check(source, clip), text_tokens=TEXT_BEFORE + TEXT_AFTER, logits="last")
    return {"ideal_speedup": 1.0 / report.flops_ratio, "flops_ratio": report.flops_ratio,
            "gflops": report.policy.flops / 1e9, "gflops_baseline": report.baseline.flops / 1e9,
            "vit_gflops": report.policy.vit / 1e9, "llm_gflops": report.policy.llm / 1e9,
            "llm_gflops_baseline": report.baseline.llm / 1e9}


def latency(model, prefill, plans, repeats):
    """Interleaved CPU / wall seconds per configuration, and the kept counts of each plan."""
    import vtdsl.compiler as vc

    kept = {}

    def log(name):
        return lambda: kept.__setitem__(name, vc.kept_counts(model)["llm"])

    fns = {"unpruned": C.plain_call(prefill),
           **{name: C.compiled_call(model, plan, prefill, log(name)) for name, plan in plans.items()}}
    cpu, wall = C.interleaved(fns, repeats)
    return cpu, wall, kept


def instrumented(model, prefill, plan, repeats) -> list[dict]:
    """Per-run CPU seconds of the forward, vtdsl's hooks, score + select, and the parts."""
    import vtdsl.compiler as vc

    before = HookTimer.snapshot(model)
    undo = []  # run last-first whatever happens
    timer = None
    if plan is not None:
        vc.compile(plan, model)
        undo.append(lambda: vc.uncompile(model))
        timer = HookTimer(model, before)
        undo.append(timer.remove)
    parts = QwenParts(model)
    undo.append(parts.remove)
    resets = [parts.reset] + ([timer.reset] if timer else [])
    runs = []
    try:
        prefill()  # warm-up
        for _ in range(repeats):
            C.gc.collect()
            for reset in resets:
                reset()
            with C.Stopwatch() as sw:
                prefill()
            sites = dict(timer.totals) if timer else {}
            run = {"cpu": sw.cpu, "hooks": timer.total if timer else 0.0,
                   "stages": timer.stage if timer else 0.0, "sites": sites}
            for part, path in QwenParts.PARTS.items():  # a part's own time, without vtdsl's hooks inside it
                run[part] = parts.totals[part] - sum(v for k, v in sites.items() if k.startswith(path + "."))
            runs.append(run)
    finally:
        for fn in reversed(undo):
            fn()
    return runs


def latency_rows(clip, cpu, wall, kept) -> list[dict]:
    base_cpu, base_wall = C.med(cpu["unpruned"]), C.med(wall["unpruned"])
    rows = []
    for name, source in POLICIES.items():
        t, tw = C.med(cpu[name]), C.med(wall[name])
        row = {"policy": name, "source": source, "kept_per_stage": {k: list(v) for k, v in kept[name].items()},
               "cpu_ms": t * 1e3, "cpu_iqr_over_median": C.spread(cpu[name]),
               "wall_ms": tw * 1e3, "wall_iqr_over_median": C.spread(wall[name]),
               "speedup": base_cpu / t, "speedup_paired": C.paired_ratio(cpu["unpruned"], cpu[name]),
               "speedup_wall": base_wall / tw, **ideal(clip, source),
               "runs_cpu_ms": [x * 1e3 for x in cpu[name]], "runs_wall_ms": [x * 1e3 for x in wall[name]]}
        row["efficiency"] = row["speedup"] / row["ideal_speedup"]
        row["efficiency_wall"] = row["speedup_wall"] / row["ideal_speedup"]
        rows.append(row)
    return rows


def overhead_rows(model, prefill, plans, repeats) -> list[dict]:
    rows = []
    for name in ["unpruned", *plans]:
        runs = instrumented(model, prefill, plans.get(name), repeats)

        def m(key, runs=runs):
            return C.med([r[key] for r in runs])

        row = {"config": name, "forward_cpu_ms": m("cpu") * 1e3,
               **{f"{part}_cpu_ms": m(part) * 1e3 for part in QwenParts.PARTS},
               "hooks_cpu_ms": m("hooks") * 1e3, "hooks_share": C.med([r["hooks"] / r["cpu"] for r in runs]),
               "stages_cpu_ms": m("stages") * 1e3, "stages_share": C.med([r["stages"] / r["cpu"] for r in runs])}
        if runs[0]["sites"]:
            sites = {k: C.med([r["sites"].get(k, 0.0) for r in runs]) * 1e3 for k in runs[0]["sites"]}
            row["sites_cpu_ms"] = sites
        rows.append(row)
    return rows


def attribute(rows, overhead) -> None:
    """Where the gap to the FLOPs-ideal goes: each tower's GFLOP/s, the LLM's own speedup
    against its FLOPs ratio, and the speedup the policy would reach were the LLM at its
    ideal and the (unpruned) ViT and lm_head at their measured time (the ceiling this
    machine's ViT speed leaves)."""
    base = next(r for r in overhead if r["config"] == "unpruned")
    first = rows[0]
    base["vit_gflop_per_s"] = first["vit_gflops"] / base["vit_cpu_ms"] * 1e3
    base["llm_gflop_per_s"] = first["llm_gflops_baseline"] / base["llm_cpu_ms"] * 1e3
    for row in rows:
        o = next(r for r in overhead if r["config"] == row["policy"])
        o["vit_gflop_per_s"] = row["vit_gflops"] / o["vit_cpu_ms"] * 1e3
        o["llm_gflop_per_s"] = row["llm_gflops"] / o["llm_cpu_ms"] * 1e3
        llm_ideal = row["llm_gflops_baseline"] / row["llm_gflops"]
        row["llm_speedup"] = base["llm_cpu_ms"] / o["llm_cpu_ms"]
        row["llm_ideal_speedup"] = llm_ideal
        row["llm_efficiency"] = row["llm_speedup"] / llm_ideal
        rest = base["forward_cpu_ms"] - base["llm_cpu_ms"]
        row["ceiling_speedup"] = base["forward_cpu_ms"] / (rest + base["llm_cpu_ms"] / llm_ideal)
        row["ceiling_efficiency"] = row["ceiling_speedup"] / row["ideal_speedup"]


def report(base_cpu, rows, overhead) -> None:
    print(f"\n   {'config':<17}{'cpu ms':>9}{'IQR':>7}{'wall ms':>9}{'speedup':>9}{'paired':>8}{'wall':>7}"
          f"{'ideal':>7}{'effic.':>8}{'wall':>7}   kept")
    print(f"   {'unpruned':<17}{base_cpu * 1e3:>9.1f}")
    for r in rows:
        print(f"   {r['policy']:<17}{r['cpu_ms']:>9.1f}{r['cpu_iqr_over_median']:>7.1%}{r['wall_ms']:>9.1f}"
              f"{r['speedup']:>9.2f}{r['speedup_paired']:>8.2f}{r['speedup_wall']:>7.2f}{r['ideal_speedup']:>7.2f}"
              f"{r['efficiency']:>8.2f}{r['efficiency_wall']:>7.2f}   {r['kept_per_stage']}")
    print(f"\n   {'config':<17}{'forward ms':>11}{'ViT':>8}{'LLM':>8}{'lm_head':>8}{'hooks ms':>10}{'hooks %':>9}"
          f"{'score+sel ms':>13}{'score+sel %':>12}")
    for r in overhead:
        print(f"   {r['config']:<17}{r['forward_cpu_ms']:>11.1f}{r['vit_cpu_ms']:>8.1f}{r['llm_cpu_ms']:>8.1f}"
              f"{r['lm_head_cpu_ms']:>8.1f}{r['hooks_cpu_ms']:>10.2f}{r['hooks_share']:>9.2%}"
              f"{r['stages_cpu_ms']:>13.2f}{r['stages_share']:>12.2%}")
    print(f"\n   {'config':<17}{'ViT GF/s':>9}{'LLM GF/s':>9}{'LLM speedup':>12}{'LLM ideal':>10}{'LLM effic.':>11}"
          f"{'ceiling':>9}{'ceil. effic.':>13}")
    for r in rows:
        o = next(x for x in overhead if x["config"] == r["policy"])
        print(f"   {r['policy']:<17}{o['vit_gflop_per_s']:>9.1f}{o['llm_gflop_per_s']:>9.1f}{r['llm_speedup']:>12.2f}"
              f"{r['llm_ideal_speedup']:>10.2f}{r['llm_efficiency']:>11.2f}{r['ceiling_speedup']:>9.2f}"
              f"{r['ceiling_efficiency']:>13.2f}")


def main() -> dict:
    args = C.timing_args(__doc__).parse_args()

    import torch

    import vtdsl.compiler as vc
    from vtdsl.compiler.families import family_of

    C.set_threads(args.threads)
    machine = C.header("video prefill: 16 frames of 448x448 on a Qwen2.5-VL-shaped model")
    spec, clip = video_spec_model()
    model = spec.build(device="cpu", dtype="float32", seed=0, attn_implementation="sdpa")
    inputs = make_inputs(spec)
    # the call's layout (from video_grid_thw) must be the one the cost model counted
    assert family_of(spec).video_spec(spec, inputs) == clip
    plans = {name: vc.resolve_plan(source, model, spec=spec) for name, source in POLICIES.items()}

    def prefill():
        with torch.inference_mode():
            return model(**inputs, logits_to_keep=1)

    cpu, wall, kept = latency(model, prefill, plans, args.repeats)
    rows = latency_rows(clip, cpu, wall, kept)
    overhead = overhead_rows(model, prefill, plans, args.repeats)
    base_cpu = C.med(cpu["unpruned"])
    attribute(rows, overhead)
    report(base_cpu, rows, overhead)
    target = next(r for r in rows if r["policy"] == TARGET)
    worst_share = max(r["stages_share"] for r in overhead if r["config"] != "unpruned")
    met = target["efficiency"] >= 0.9 and worst_share <= 0.03
    print(f"\n   target ({TARGET} efficiency >= 0.9, score + select <= 3 %): {'met' if met else 'NOT met'} "
          f"(efficiency {target['efficiency']:.2f}, worst score + select {worst_share:.2%})")
    result = {
        "machine": machine, "repeats": args.repeats, "clock": "cpu (process_time) headline; wall alongside",
        "model": {"vit": VIT, "llm": LLM, "frames": FRAMES, "frame_size": [HEIGHT, WIDTH],
                  "temporal_groups": GROUPS, "video_tokens": VIDEO_TOKENS,
                  "text_tokens": TEXT_BEFORE + TEXT_AFTER},
        "unpruned_cpu_ms": base_cpu * 1e3, "unpruned_wall_ms": C.med(wall["unpruned"]) * 1e3,
        "unpruned_cpu_iqr_over_median": C.spread(cpu["unpruned"]),
        "unpruned_runs_cpu_ms": [x * 1e3 for x in cpu["unpruned"]],
        "unpruned_runs_wall_ms": [x * 1e3 for x in wall["unpruned"]],
        "latency": rows, "overhead": overhead,
        "target": {"policy": TARGET, "efficiency": target["efficiency"], "worst_stages_share": worst_share,
                   "met": met},
        "load_average_after": [round(x, 2) for x in C.load_average()],
    }
    C.save("video", result)
    return result


if __name__ == "__main__":
    main()
