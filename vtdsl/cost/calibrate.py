"""`vtdsl calibrate`: measure this machine for the latency model (about 10 seconds).

Four micro-benchmarks, each the median of a few timed repeats after a warm-up:
- matmul FLOP/s per dtype (a 1024^3 product; 4096^3 on a GPU, which 1024 cannot fill),
- attention FLOP/s (sdpa over 8 heads x 640 tokens x 64, `4·N²·qd` FLOPs),
- memory bandwidth (copying a 256 MiB tensor: read + write),
- dispatch time per transformer layer (a 1-token forward of a tiny Llama with 6 layers
  minus the same with 2, divided by 4: what a layer costs when its arithmetic is nothing).
torch and transformers are imported here only, so the cost model stays free of them.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from .latency import DeviceProfile


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up: allocations, kernel selection
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Probe:
    def __init__(self, target: str, repeats: int):
        import torch

        self.torch, self.device, self.repeats = torch, torch.device(target), repeats
        self.sync = torch.cuda.synchronize if target == "cuda" else (lambda: None)

    def time(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        return _median_seconds(fn, repeats or self.repeats, self.sync)

    def matmul_flops(self, dtype) -> float:
        n = 4096 if self.device.type == "cuda" else 1024
        a, b = (self.torch.randn(n, n, device=self.device).to(dtype) for _ in range(2))
        return 2 * n**3 / self.time(lambda: a @ b)

    def attention_flops(self, dtype) -> float:
        q, k, v = (self.torch.randn(1, 8, 640, 64, device=self.device).to(dtype) for _ in range(3))
        sdpa = self.torch.nn.functional.scaled_dot_product_attention
        return 4 * 640 * 640 * 8 * 64 / self.time(lambda: sdpa(q, k, v, is_causal=True))

    def bandwidth(self) -> float:
        src = self.torch.ones(64 * 2**20, device=self.device)  # 256 MiB of float32
        dst = self.torch.empty_like(src)
        return 2 * src.numel() * 4 / self.time(lambda: dst.copy_(src))

    def layer_overhead(self) -> float:
        from transformers import LlamaConfig, LlamaForCausalLM

        def model(layers: int):
            cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=32, max_position_embeddings=64)
            return LlamaForCausalLM(cfg).eval().to(self.device)

        ids = self.torch.zeros(1, 1, dtype=self.torch.long, device=self.device)
        shallow, deep = model(2), model(6)
        t_shallow = self.time(lambda: shallow(ids, use_cache=False), self.repeats * 4)
        t_deep = self.time(lambda: deep(ids, use_cache=False), self.repeats * 4)
        return max(t_deep - t_shallow, 0.0) / 4


PROBES = ("matmul", "attention", "bandwidth", "dispatch")


def calibrate(name: str = "cpu", target: str = "cpu", threads: int | None = None, repeats: int = 5,
              on_probe: Callable[[str], None] = lambda probe: None) -> DeviceProfile:
    """Measure `target` ("cpu" with `threads` torch threads, default torch's; or "cuda").
    `on_probe(name)` is called after each of `PROBES` (for a progress bar)."""
    import torch

    if target == "cuda" and not torch.cuda.is_available():
        raise ValueError("no CUDA device is available to calibrate")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        probe = _Probe(target, repeats)
        with torch.inference_mode():
            dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
            peaks = {name: probe.matmul_flops(dt) for name, dt in dtypes.items()}
            on_probe("matmul")
            attention = {name: probe.attention_flops(dt) for name, dt in dtypes.items()}
            on_probe("attention")
            bandwidth = probe.bandwidth()
            on_probe("bandwidth")
            overhead = probe.layer_overhead()
            on_probe("dispatch")
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    where = f"{used} torch thread(s)" if target == "cpu" else torch.cuda.get_device_name()
    return DeviceProfile(name, peaks, bandwidth, fused_attention=True, attention_flops=attention,
                         layer_overhead=overhead,
                         source=f"vtdsl calibrate, {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
