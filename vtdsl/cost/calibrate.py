"""`vtdsl calibrate`: measure this machine for the latency model (about 10 seconds).

Micro-benchmarks, each the median of a few timed repeats after a warm-up:
- matmul FLOP/s per dtype (a 1024^3 product; 4096^3 on a GPU, which 1024 cannot fill),
- attention FLOP/s (sdpa over 8 heads x 640 tokens x 64, `4·N²·qd` FLOPs), twice: without
  a mask, as a ViT runs it, and with `is_causal=True`, as transformers runs an LLM prefill
  whose attention mask has no padding (it then drops the mask; an explicit boolean mask
  would be slower still, about 0.7x on the CPU, and is not what runs),
- memory bandwidth (copying a 256 MiB tensor: read + write),
- elementwise rate (elements per second of a product of two 640 x 1024 float32 tensors: the
  size of one layer's activations, where norms, activations and residual adds run),
- dispatch time per transformer layer (a 1-token forward of a tiny Llama with 6 layers
  minus the same with 2, divided by 4: what a layer costs when its arithmetic is nothing),
  and the same for a vision-encoder layer (a tiny CLIP ViT, 4 patches).
torch and transformers are imported here only, so the cost model stays free of them.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from .latency import DeviceProfile


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None],
                    clock: Callable[[], float] = time.perf_counter) -> float:
    fn()  # warm-up: allocations, kernel selection
    sync()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return statistics.median(times)


class _Probe:
    def __init__(self, target: str, repeats: int):
        import torch

        self.torch, self.device, self.repeats = torch, torch.device(target), repeats
        self.sync = torch.cuda.synchronize if target == "cuda" else (lambda: None)
        # One CPU thread runs every op on the calling thread: its CPU time is the work itself
        # and does not grow while another process holds the core (shared machines).
        single = target == "cpu" and torch.get_num_threads() == 1
        self.clock = time.process_time if single else time.perf_counter

    def time(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        return _median_seconds(fn, repeats or self.repeats, self.sync, self.clock)

    def matmul_flops(self, dtype) -> float:
        n = 4096 if self.device.type == "cuda" else 1024
        a, b = (self.torch.randn(n, n, device=self.device).to(dtype) for _ in range(2))
        return 2 * n**3 / self.time(lambda: a @ b)

    def attention_flops(self, dtype, causal: bool) -> float:
        q, k, v = (self.torch.randn(1, 8, 640, 64, device=self.device).to(dtype) for _ in range(3))
        sdpa = self.torch.nn.functional.scaled_dot_product_attention
        return 4 * 640 * 640 * 8 * 64 / self.time(lambda: sdpa(q, k, v, is_causal=causal))

    def bandwidth(self) -> float:
        src = self.torch.ones(64 * 2**20, device=self.device)  # 256 MiB of float32
        dst = self.torch.empty_like(src)
        return 2 * src.numel() * 4 / self.time(lambda: dst.copy_(src))

    def elementwise_rate(self) -> float:
        a, b = (self.torch.randn(640, 1024, device=self.device) for _ in range(2))
        return a.numel() / self.time(lambda: a * b, self.repeats * 4)

    def layer_overhead(self) -> float:
        from transformers import LlamaConfig, LlamaForCausalLM

        def model(layers: int):
            cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=32, max_position_embeddings=64)
            return LlamaForCausalLM(cfg).eval().to(self.device)

        ids = self.torch.zeros(1, 1, dtype=self.torch.long, device=self.device)
        return self._per_layer(model, lambda m: m(ids, use_cache=False))

    def vit_layer_overhead(self) -> float:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        def model(layers: int):
            cfg = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, image_size=28, patch_size=14)
            return CLIPVisionModel(cfg).eval().to(self.device)

        pixels = self.torch.zeros(1, 3, 28, 28, device=self.device)
        return self._per_layer(model, lambda m: m(pixel_values=pixels))

    def _per_layer(self, build, call) -> float:
        shallow, deep = build(2), build(6)
        t_shallow = self.time(lambda: call(shallow), self.repeats * 4)
        t_deep = self.time(lambda: call(deep), self.repeats * 4)
        return max(t_deep - t_shallow, 0.0) / 4


PROBES = ("matmul", "attention", "bandwidth", "elementwise", "dispatch")


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
            attention = {name: probe.attention_flops(dt, causal=False) for name, dt in dtypes.items()}
            causal = {name: probe.attention_flops(dt, causal=True) for name, dt in dtypes.items()}
            on_probe("attention")
            bandwidth = probe.bandwidth()
            on_probe("bandwidth")
            elementwise = probe.elementwise_rate()
            on_probe("elementwise")
            overhead, vit_overhead = probe.layer_overhead(), probe.vit_layer_overhead()
            on_probe("dispatch")
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    where = f"{used} torch thread(s)" if target == "cpu" else torch.cuda.get_device_name()
    return DeviceProfile(name, peaks, bandwidth, fused_attention=True, attention_flops=attention,
                         layer_overhead=overhead, elementwise_rate=elementwise, causal_attention_flops=causal,
                         vit_layer_overhead=vit_overhead,
                         source=f"vtdsl calibrate, {where}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
