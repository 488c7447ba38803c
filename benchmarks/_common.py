"""Shared pieces of the benchmarks: the benchmark model, its prompt, policies, timing.

The benchmark model is LLaVA-1.5 shaped where token counts matter and reduced where they
do not: CLIP ViT at 336 px with 14 px patches (24x24 = 576 patches + CLS = 577 tokens per
ViT layer, features from layer -2, CLS dropped, 576 visual tokens into the LLM) and a
Llama LLM, with widths and depths cut so that a prefill takes well under a second on one
CPU core. It is built through `vtdsl.models.spec_from_config`, so the cost model and the
compiler see exactly this architecture. Weights are random (seeded); float32.

Every script imports this module, so they all measure the same model and prompt.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"

# --------------------------------------------------------------------------- the model
VIT = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=8)
LLM = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
           num_hidden_layers=8)
IMAGE_TOKEN = 32000
PAD_TOKEN = 32001
VOCAB = 32064
TEXT_BEFORE = 5  # BOS + "USER:" style system text before the image
TEXT_AFTER = 59  # question + "ASSISTANT:" after the image; 64 text tokens in all
TEXT_TOKENS = TEXT_BEFORE + TEXT_AFTER


def bench_config():
    """The `LlavaConfig` of the benchmark model (llava-1.5 geometry, reduced widths)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=256, **VIT)
    text = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=PAD_TOKEN, **LLM)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        pad_token_id=PAD_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        vocab_size=VOCAB,
    )
    config.dtype = "float32"
    config.text_config.dtype = "float32"
    return config


_SPEC = None


def bench_spec():
    """`ModelSpec` of the benchmark model (through `spec_from_config`, cached)."""
    global _SPEC
    if _SPEC is None:
        from vtdsl.models import spec_from_config

        _SPEC = spec_from_config(bench_config(), name="bench-llava",
                                 description="llava-1.5 geometry, ViT 256x8, LLM 512x8 (benchmarks)")
    return _SPEC


def build_model(attn: str = "sdpa", seed: int = 0):
    """The benchmark model with seeded random weights, float32, eval mode, on the CPU."""
    return bench_spec().build(device="cpu", dtype="float32", seed=seed, attn_implementation=attn)


def make_inputs(seed: int = 0, batch: int = 1):
    """One prompt: 5 text tokens, 576 image placeholders, 59 text tokens; one image."""
    import torch

    g = torch.Generator().manual_seed(seed)
    before = torch.randint(1, 30000, (batch, TEXT_BEFORE), generator=g)
    after = torch.randint(1, 30000, (batch, TEXT_AFTER), generator=g)
    image = torch.full((batch, bench_spec().image_tokens), IMAGE_TOKEN, dtype=torch.long)
    input_ids = torch.cat([before, image, after], dim=1)
    pixel_values = torch.randn(batch, 3, 336, 336, generator=g)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values,
    }


# --------------------------------------------------------------------------- policies
# Benchmark policies with the structure of the zoo files (policies/*.vt), at layers that
# exist in the 8-layer LLM. name -> (source, visual tokens entering the LLM after pruning)
VIT_POLICIES = {
    # policies/visionzip*.vt: CLS-attention top k + contextual merge, after the ViT
    "visionzip-192": "at vit.out keep cls top 162 then merge rest into 30",
    "visionzip-128": "at vit.out keep cls top 108 then merge rest into 20",
    "visionzip-64": "at vit.out keep cls top 54 then merge rest into 10",
}
LLM_POLICIES = {
    # policies/fastv.vt at a fixed count: last-text attention of layer 1, pruned entering layer 2
    "fastv-192": "at llm.layer2 keep text top 192",
    "fastv-128": "at llm.layer2 keep text top 128",
    "fastv-64": "at llm.layer2 keep text top 64",
}
POLICIES = {**VIT_POLICIES, **LLM_POLICIES}


def kept_tokens_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


def check_policy(source: str):
    """The checked `Plan` of `source` on the benchmark model."""
    from vtdsl import ir, lang

    return ir.check(lang.parse(source), bench_spec())


def ideal(source: str) -> dict:
    """Cost-model FLOPs of `source` vs the unpruned benchmark model (64 text tokens,
    last-position logits as in a generate prefill)."""
    from vtdsl.cost import estimate

    report = estimate(check_policy(source), text_tokens=TEXT_TOKENS, logits="last")
    return {
        "flops": report.policy.flops,
        "flops_baseline": report.baseline.flops,
        "flops_ratio": report.flops_ratio,
        "ideal_speedup": 1.0 / report.flops_ratio,
        "kv_ratio": report.kv_ratio,
        "kv_bytes": report.policy.kv_bytes,
        "kv_bytes_baseline": report.baseline.kv_bytes,
    }


# --------------------------------------------------------------------------- timing
def set_threads(n: int | None) -> int:
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class Stopwatch:
    """Wall-clock and process CPU time of a block: ``with Stopwatch() as sw: ...``.

    With one torch thread every op runs on the calling thread, so the process CPU time is
    the time the code itself needed: it equals the wall-clock latency on an idle core, and
    unlike wall-clock it does not grow while the scheduler runs another process on our
    core (the shared machine, see README). Both are recorded; CPU time is the headline
    when `torch_threads == 1`.
    """

    __slots__ = ("wall", "cpu", "_w", "_c")

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c
        return False


def interleaved(fns: dict[str, Callable], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """CPU and wall seconds of `repeats` rounds in which every function runs once, in turn
    (after one warm-up call each): load from other processes hits every configuration alike."""
    for fn in fns.values():
        fn()
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            sw = fn()
            cpu[k].append(sw.cpu)
            wall[k].append(sw.wall)
    return cpu, wall


def timing_args(doc: str, repeats: int = 7):
    """The options every timing script takes; returns the parser for more."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see README)")
    return parser


def plain_call(fn: Callable) -> Callable[[], Stopwatch]:
    def run():
        with Stopwatch() as sw:
            fn()
        return sw

    return run


def compiled_call(model, plan, fn: Callable, after: Callable[[], None] | None = None) -> Callable[[], Stopwatch]:
    """Times `fn()` with `plan` installed on `model` (installing and `after()`, which may read
    the compiled model's logs, are not timed); the model is left uncompiled."""
    import vtdsl.compiler as vc

    def run():
        vc.compile(plan, model)
        try:
            with Stopwatch() as sw:
                fn()
            if after is not None:
                after()
            return sw
        finally:
            vc.uncompile(model)

    return run


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> float:
    """Relative half-range of the middle runs: (q75 - q25) / median (IQR / median)."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / statistics.median(xs)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios num[i] / den[i] (runs i were taken back to back)."""
    return statistics.median(a / b for a, b in zip(num, den))


# --------------------------------------------------------------------------- machine
def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover
        return (float("nan"),) * 3


def busy_other_processes() -> int:
    """Processes (not us) that used more than half a core over the last second."""
    try:
        out = subprocess.run(["top", "-bn2", "-d1"], capture_output=True, text=True, timeout=10).stdout
    except Exception:  # noqa: BLE001
        return -1
    block = out.split("top - ")[-1].splitlines()
    busy = 0
    me = os.getpid()
    started = False
    for line in block:
        parts = line.split()
        if parts[:1] == ["PID"]:
            started = True
            continue
        if started and len(parts) >= 12 and parts[0].isdigit() and int(parts[0]) != me:
            try:
                if float(parts[8]) > 50:
                    busy += 1
            except ValueError:
                pass
    return busy


def machine() -> dict:
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in load_average()],
        "other_busy_processes": busy_other_processes(),
    }


def header(title: str) -> dict:
    m = machine()
    print(f"== {title}")
    print(f"   machine: nproc={m['nproc']} cpu={m['cpu']!r} torch={m['torch']} transformers={m['transformers']} "
          f"torch_threads={m['torch_threads']}")
    print(f"   contention: load average {m['load_average']}, {m['other_busy_processes']} other process(es) "
          "using > 50% of a core")
    return m


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"   wrote {path.relative_to(ROOT)}")
    return path
