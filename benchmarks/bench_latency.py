"""Predicted vs measured speedups of the latency model on this CPU (issue 21, item 2).

    .venv/bin/python benchmarks/bench_latency.py [--repeats 3] [--threads 1] [--batches 1 8] [--policies ...]

The zoo runs unchanged at its paper settings, so the model here is the benchmark model's
LLaVA-1.5 geometry at LLaVA-1.5's depth (CLIP ViT 24 layers on 577 tokens, features from
layer -2; Llama 32 layers; 576 + 64 prompt tokens) with narrow widths (ViT 64, LLM 128) so
that a prefill takes a fraction of a second on one core. First this CPU is calibrated
(`vtdsl.cost.calibrate`, same thread count); then, for every zoo policy that checks on
the model, at batch 1 and 8: prefill latency (one forward, last-position logits, as
generate's prefill runs it) and decode latency per token (one `generate` of 16 tokens,
timed by a logits processor generate calls once per new token: the CPU time between
consecutive calls, 15 decode steps, the median step over all rounds, so a step another
process disturbed does not move it; no prefill in the figure), unpruned and compiled,
interleaved round by round; results are saved after every row; the
measured speedups against those the latency model predicts (`vtdsl.cost.latency.predict`
on the calibrated profile, at the mean context of the timed steps). Target: every
prediction within 10 % of the measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import _common as C

NEW_TOKENS = 16


def deep_spec():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vtdsl.models import spec_from_config

    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=64, hidden_size=64,
                              intermediate_size=256, num_attention_heads=1, num_hidden_layers=24)
    text = LlamaConfig(vocab_size=C.VOCAB, max_position_embeddings=4096, pad_token_id=C.PAD_TOKEN, hidden_size=128,
                       intermediate_size=344, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=32)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=C.IMAGE_TOKEN,
                         pad_token_id=C.PAD_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False, vocab_size=C.VOCAB)
    config.dtype = config.text_config.dtype = "float32"
    return spec_from_config(config, name="bench-llava-deep", description="llava-1.5 depth, ViT 64 / LLM 128 wide")


def runner(model, inputs):
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        """generate calls it once per new token, after that token's forward: the gaps
        between its calls are whole decode steps (forward, sampling, cache update)."""

        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.process_time())
            return scores

    def run() -> tuple[float, list[float]]:
        """(prefill seconds, [decode step seconds])"""
        start = time.process_time()
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)
        prefill = time.process_time() - start
        clock = Clock()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                           logits_processor=LogitsProcessorList([clock]))
        steps = clock.stamps
        assert len(steps) == NEW_TOKENS, len(steps)
        return prefill, [b - a for a, b in zip(steps, steps[1:])]

    return run


def measure(model, inputs, plan, repeats: int) -> dict:
    """Medians over `repeats` rounds, unpruned and compiled taking turns within a round."""
    import vtdsl.compiler as vc

    samples = {k: [] for k in ("base_prefill", "base_decode", "pol_prefill", "pol_decode")}
    run = runner(model, inputs)
    for round_ in range(repeats + 1):  # round 0 warms both up
        for side in ("base", "pol"):
            ctx = vc.apply(plan, model) if side == "pol" else _Nothing()
            with ctx:
                p, d = run()
            if round_:
                samples[f"{side}_prefill"].append(p)
                samples[f"{side}_decode"].extend(d)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"prefill_speedup": med["base_prefill"] / med["pol_prefill"],
            "decode_speedup": med["base_decode"] / med["pol_decode"],
            **{f"{k}_ms": 1e3 * v for k, v in med.items()}}


def _report(plan, model, inputs):
    """The cost report of what runs: an adaptive stage (`top N by outliers`, `by
    entropy`) is charged at its upper bound by `estimate`, so for those the counts are
    the ones a forward of this very prompt kept (`kept_counts`; on random weights
    prumerge keeps 5 of its bound of 145)."""
    import torch

    import vtdsl.compiler as vc
    from vtdsl.cost import estimate
    from vtdsl.cost.estimate import _ExpectedWalk, estimate_counts

    kw = {"text_tokens": C.TEXT_TOKENS, "decode_context": NEW_TOKENS // 2}
    if all(s.tokens_out_min is None for s in plan.stages):
        return estimate(plan, **kw)
    with vc.apply(plan, model), torch.inference_mode():
        model(**inputs, logits_to_keep=1)
        kept = {**vc.kept_counts(model)["vit"], **vc.kept_counts(model)["llm"]}
    walk = _ExpectedWalk(plan.spec)
    for stage in plan.stages:
        out = kept.get(f"{stage.site.text()}#{stage.index}", (0, stage.tokens_out))[1]
        walk.leave(stage.site, min(out, walk.entering(stage.site)))
    return estimate_counts(plan.spec, *walk.result(), observations=plan.observations, stages=plan.stages, **kw)


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--policies", nargs="*", help="zoo file names (default: all)")
    parser.add_argument("--out", default="latency", help="results/NAME.json (default: latency)")
    args = parser.parse_args()

    import vtdsl
    from vtdsl.compiler import CompileError
    from vtdsl.cost.calibrate import calibrate
    from vtdsl.cost.latency import predict
    from vtdsl.lang.errors import PolicyError

    C.set_threads(args.threads)
    machine = C.header("latency model: predicted vs measured speedups")
    profile = calibrate("cpu", threads=args.threads)
    causal = profile.attention_peak("float32", causal=True)
    print(f"   profile: fp32 {profile.peak('float32') / 1e9:.1f} GFLOP/s, attention "
          f"{profile.attention_peak('float32') / 1e9:.1f} (causal {causal / 1e9:.1f}), "
          f"{profile.bandwidth / 1e9:.1f} GB/s, {1e6 * profile.layer_overhead:.0f} us/LLM layer, "
          f"{1e6 * profile.vit_overhead:.0f} us/ViT layer")
    spec = deep_spec()
    model = spec.build(device="cpu", dtype="float32", seed=0, attn_implementation="sdpa")
    files = sorted((C.ROOT / "policies").glob("*.vt"))
    if args.policies:
        files = [f for f in files if f.name in args.policies]
    rows, refused = [], {}
    for batch in args.batches:
        inputs = C.make_inputs(batch=batch)
        for path in files:
            try:
                plan = vtdsl.check(path, spec)
            except PolicyError as err:
                refused[path.name] = err.diagnostics[0].message
                continue
            # the timed steps generate tokens 2..16: their mean cached context is 8.5 + prompt
            try:
                report = _report(plan, model, inputs)
                m = measure(model, inputs, plan, args.repeats)
            except CompileError as err:  # checks, but needs what this model lacks (a CLIP text tower)
                refused[path.name] = str(err)
                continue
            lat = predict(report, profile, batch=batch, dtype="float32")
            row = {"policy": path.stem, "batch": batch, **m, "predicted_prefill": lat.prefill_speedup,
                   "predicted_decode": lat.decode_speedup, "flops_ideal": 1 / report.flops_ratio,
                   "visual_tokens": report.policy.visual}
            row["prefill_error"] = row["predicted_prefill"] / row["prefill_speedup"] - 1
            row["decode_error"] = row["predicted_decode"] / row["decode_speedup"] - 1
            rows.append(row)
            _save(args.out, machine, profile, rows, refused, args.repeats, quiet=True)  # a stopped run keeps its rows
            print(f"   batch {batch} {path.stem:16s} prefill {m['prefill_speedup']:.2f}x (predicted "
                  f"{lat.prefill_speedup:.2f}x, {100 * row['prefill_error']:+.1f}%)  decode {m['decode_speedup']:.2f}x "
                  f"(predicted {lat.decode_speedup:.2f}x, {100 * row['decode_error']:+.1f}%)", flush=True)
    result = _save(args.out, machine, profile, rows, refused, args.repeats)
    print(f"   worst prediction error {100 * result['worst_error']:.1f}% over {len(rows)} runs (target <= 10%); "
          f"{len(refused)} policies refused on this model")
    return result


def _save(name: str, machine: dict, profile, rows: list[dict], refused: dict, repeats: int,
          quiet: bool = False) -> dict:
    worst = max((abs(r[k]) for r in rows for k in ("prefill_error", "decode_error")), default=0.0)
    shared = (f"load average {machine.get('load_average')} and {machine.get('other_busy_processes')} other busy "
              "process(es) at the start: times are the process CPU time of one torch thread, medians of "
              "interleaved rounds")
    result = {"machine": machine, "note": shared, "profile": profile.to_json(), "rows": rows, "refused": refused,
              "worst_error": worst, "new_tokens": NEW_TOKENS, "repeats": repeats}
    if quiet:
        C.RESULTS.mkdir(parents=True, exist_ok=True)
        (C.RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    else:
        C.save(name, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
