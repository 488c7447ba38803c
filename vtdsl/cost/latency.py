"""Predicted latency: a roofline over the operations of one prefill and one decode step.

Every operation of the unpruned and the pruned model (the projections, attention and MLP
of each ViT and LLM layer, the patch embedding, the projector, the lm_head, the scorers'
extra matmuls) gets its FLOPs and the bytes it moves (weights, activations in and out, the
KV cache it reads); on a `DeviceProfile` it takes

    time = max(FLOPs / peak FLOP/s, bytes / bandwidth)

plus, per layer, the profile's fixed dispatch time (kernel launches, Python; its own figure
for a vision-encoder layer, which launches fewer kernels than a decoder layer). Attention
in a causal prefill (the LLM: transformers passes `is_causal=True` when the prompt has no
padding) runs at its own rate: a causal kernel skips the blocks above the diagonal, so the
same counted FLOPs take less time than the ViT's bidirectional attention. A phase is
*compute-bound* when most of its time comes from operations whose FLOPs term wins.
docs/cost-model.md ("Predicted latency") gives the formulas. Token counts are the cost
model's (`CostReport`), so a plan's latency follows the same per-layer counts as its FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ..models.spec import DTYPE_BYTES
from .model import constants


@dataclass(frozen=True)
class DeviceProfile:
    """What the roofline needs to know about one device.

    `peak_flops`: dense matmul FLOP/s per dtype; `attention_flops`: FLOP/s of the
    bidirectional attention kernel (ViT) when it differs from the matmul peak (CPU sdpa);
    `causal_attention_flops`: the same for causal prefill attention, counting the whole
    N x N square as the FLOPs convention does (empty = `attention_flops`); `bandwidth`: main
    memory bytes/s; `fused_attention`: attention as one kernel (no N x N score matrix in
    memory); `layer_overhead`: seconds of dispatch per LLM layer call; `vit_layer_overhead`:
    the same for a ViT layer (None = `layer_overhead`);
    `elementwise_rate`: elements per second one elementwise pass (norm step, activation,
    residual add, RoPE term) processes, 0 = bandwidth / (3 x dtype bytes): two reads, one write.
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    fused_attention: bool = True
    attention_flops: dict[str, float] = field(default_factory=dict)
    layer_overhead: float = 0.0
    elementwise_rate: float = 0.0
    source: str = ""
    causal_attention_flops: dict[str, float] = field(default_factory=dict)
    vit_layer_overhead: float | None = None

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise ValueError(f"device profile '{self.name}' has no {dtype} peak "
                             f"(it knows {', '.join(self.peak_flops)})") from None

    def attention_peak(self, dtype: str, causal: bool = False) -> float:
        rate = self.causal_attention_flops.get(dtype) if causal else None
        return rate or self.attention_flops.get(dtype) or self.peak(dtype)

    @property
    def vit_overhead(self) -> float:
        return self.layer_overhead if self.vit_layer_overhead is None else self.vit_layer_overhead

    def to_json(self) -> dict:
        return {"name": self.name, "peak_flops": dict(self.peak_flops), "bandwidth": self.bandwidth,
                "fused_attention": self.fused_attention, "attention_flops": dict(self.attention_flops),
                "layer_overhead": self.layer_overhead, "elementwise_rate": self.elementwise_rate,
                "source": self.source, "causal_attention_flops": dict(self.causal_attention_flops),
                "vit_layer_overhead": self.vit_layer_overhead}

    @classmethod
    def from_json(cls, data: dict) -> "DeviceProfile":
        return cls(name=str(data["name"]), peak_flops={str(k): float(v) for k, v in data["peak_flops"].items()},
                   bandwidth=float(data["bandwidth"]), fused_attention=bool(data.get("fused_attention", True)),
                   attention_flops={str(k): float(v) for k, v in (data.get("attention_flops") or {}).items()},
                   layer_overhead=float(data.get("layer_overhead", 0.0)),
                   elementwise_rate=float(data.get("elementwise_rate", 0.0)), source=str(data.get("source", "")),
                   causal_attention_flops={str(k): float(v)
                                           for k, v in (data.get("causal_attention_flops") or {}).items()},
                   vit_layer_overhead=None if data.get("vit_layer_overhead") is None
                   else float(data["vit_layer_overhead"]))


@dataclass(frozen=True)
class Op:
    """One operation: its FLOPs, the bytes it moves, and whether it is attention."""

    part: str
    flops: float
    bytes: float
    attention: bool = False
    elements: float = 0  # elementwise passes x elements (timed at the elementwise rate, not a roof)
    causal: bool = False  # causal prefill attention (its own rate, see DeviceProfile)


@dataclass(frozen=True)
class PhaseTime:
    """Predicted seconds of one phase, split by which roof each operation hit."""

    seconds: float
    compute_s: float
    memory_s: float
    overhead_s: float

    @property
    def ms(self) -> float:
        return 1e3 * self.seconds

    @property
    def bound(self) -> str:
        """'compute', 'memory' or 'overhead': where most of the time goes."""
        return max((self.compute_s, "compute"), (self.memory_s, "memory"), (self.overhead_s, "overhead"))[1]


@dataclass(frozen=True)
class Latency:
    """Prefill and one decode step, unpruned and under the policy."""

    device: str
    dtype: str
    batch: int
    decode_context: int
    baseline_prefill: PhaseTime
    policy_prefill: PhaseTime
    baseline_decode: PhaseTime
    policy_decode: PhaseTime

    def metric(self, name: str) -> tuple[float, float]:
        """(policy, baseline) seconds of a budget metric: latency (prefill) or
        decode_latency (one decode step at the report's context)."""
        phases = {"latency": (self.policy_prefill, self.baseline_prefill),
                  "decode_latency": (self.policy_decode, self.baseline_decode)}
        if name not in phases:
            raise ValueError(f"unknown latency metric {name!r}")
        policy, baseline = phases[name]
        return policy.seconds, baseline.seconds

    @property
    def prefill_speedup(self) -> float:
        """Unpruned over pruned prefill time: above 1 the policy is faster."""
        policy, baseline = self.metric("latency")
        return baseline / policy

    @property
    def decode_speedup(self) -> float:
        policy, baseline = self.metric("decode_latency")
        return baseline / policy

    def to_json(self) -> dict:
        def phase(t: PhaseTime) -> dict:
            return {"ms": t.ms, "bound": t.bound, "compute_ms": 1e3 * t.compute_s,
                    "memory_ms": 1e3 * t.memory_s, "overhead_ms": 1e3 * t.overhead_s}

        return {
            "device": self.device, "dtype": self.dtype, "batch": self.batch, "decode_context": self.decode_context,
            "prefill": {"baseline": phase(self.baseline_prefill), "policy": phase(self.policy_prefill),
                        "speedup": self.prefill_speedup},
            "decode_per_token": {"baseline": phase(self.baseline_decode), "policy": phase(self.policy_decode),
                                 "speedup": self.decode_speedup},
        }

    def summary(self) -> str:
        return (f"latency on {self.device} ({self.dtype}, batch {self.batch}): "
                f"prefill {self.policy_prefill.ms:.4g} / {self.baseline_prefill.ms:.4g} ms "
                f"= {self.prefill_speedup:.2f}x faster ({self.policy_prefill.bound}-bound); "
                f"decode {self.policy_decode.ms:.4g} / {self.baseline_decode.ms:.4g} ms/token "
                f"at context +{self.decode_context} = {self.decode_speedup:.2f}x ({self.policy_decode.bound}-bound)")


# ------------------------------------------------------------------ operations
def _layer_ops(part: str, tower, n: int, seqs: int, pairs: int, e: int, fused: bool,
               rope: bool = False) -> Iterator[Op]:
    """One transformer layer on `seqs` sequences of `n` tokens (`pairs` attention pairs each);
    `rope`: an LLM layer (rotary terms, causal attention)."""
    d, qd, kvd, ffn, k = tower.hidden, tower.q_width, tower.kv_width, tower.ffn, tower.mlp_matmuls
    rows = seqs * n
    yield Op(part, 2 * rows * d * (qd + 2 * kvd), e * (d * (qd + 2 * kvd) + rows * (d + qd + 2 * kvd)))
    scores = 0 if fused else 4 * seqs * tower.heads * pairs * e  # written, read by softmax, written, read by AV
    yield Op(part, 4 * seqs * pairs * qd, e * rows * 2 * (qd + kvd) + scores, attention=True, causal=rope)
    yield Op(part, 2 * rows * qd * d, e * (qd * d + rows * (qd + d)))
    yield Op(part, 2 * rows * d * ffn * k, e * (k * d * ffn + rows * (2 * d + k * ffn)))
    yield Op(part, 0, 0, elements=rows * elementwise_passes(tower, rope))


def elementwise_passes(tower, rope: bool) -> int:
    """Elementwise passes per token of one layer, as transformers' modules run them: two
    norms (RMSNorm: square, mean, scale, weight = 4 passes; LayerNorm: 2), two residual
    adds, the MLP activation (SwiGLU: silu and the product = 2 passes over ffn; CLIP's
    quick-GELU: scale, sigmoid, product = 3), RoPE on q and k (rotate, two products, sum,
    negation = 5), and the copies that lay q, k, v out by head."""
    d, ffn, qkv = tower.hidden, tower.ffn, tower.q_width + 2 * tower.kv_width
    norms = 2 * (4 if tower.mlp == "swiglu" else 2) * d
    activation = (2 if tower.mlp == "swiglu" else 3) * ffn
    rotary = 5 * (tower.q_width + tower.kv_width) if rope else 0
    return norms + 2 * d + activation + rotary + qkv

def prefill_ops(k, vit_tokens, projector_tokens, llm_visual, text_tokens: int, batch: int, fused: bool,
                scorer_flops: int = 0) -> Iterator[Op]:
    """The operations of one prefill of `batch` prompts with the given per-layer counts."""
    spec, e = k.spec, k.spec.dtype_bytes
    crops = batch * k.crops
    yield Op("vit", crops * k.patch, e * (crops * spec.patch_tokens * (spec.channels * spec.patch_size ** 2
                                                                       * spec.temporal_patch + spec.vit.hidden)))
    for i, n in enumerate(vit_tokens):
        yield from _layer_ops("vit", spec.vit, n, crops, k.vit_pairs(i, n), e, fused)
    widths = spec.projector
    for _ in spec.deepstack_layers:  # DeepStack's mergers, as wide as the projector, on its input
        rows = batch * projector_tokens
        yield Op("vit", k.proj * rows, e * sum(a * b + rows * (a + b) for a, b in zip(widths, widths[1:])))
    rows = batch * projector_tokens
    yield Op("projector", batch * k.proj * projector_tokens,
             e * sum(a * b + rows * (a + b) for a, b in zip(widths, widths[1:])))
    for v in llm_visual:
        n = text_tokens + v
        yield from _layer_ops("llm", spec.llm, n, batch, n * n, e, fused, rope=True)
    yield Op("lm_head", batch * k.head, e * (spec.llm.hidden * spec.vocab_size + batch * spec.vocab_size))
    if scorer_flops:
        yield Op("scorers", batch * scorer_flops, 0)


def decode_ops(k, contexts, batch: int) -> Iterator[Op]:
    """One decode step of `batch` sequences; `contexts[l]`: cached tokens at LLM layer l."""
    spec, e = k.spec, k.spec.dtype_bytes
    t = spec.llm
    for c in contexts:
        for op in _layer_ops("llm", t, 1, batch, 0, e, True, rope=True):
            if op.attention:  # one query against the cache: read every cached K and V once
                op = Op("llm", 4 * batch * (c + 1) * t.q_width, e * batch * (c + 1) * 2 * t.kv_width, True)
            yield op
        # transformers' DynamicCache appends by concatenation: the layer's whole K and V are
        # read and written again every step
        yield Op("llm", 0, e * batch * 2 * (2 * c + 1) * t.kv_width)
    yield Op("lm_head", batch * k.head, e * (t.hidden * spec.vocab_size + batch * spec.vocab_size))


def roofline(ops, profile: DeviceProfile, dtype: str, layers: int, vit_layers: int = 0) -> PhaseTime:
    """Sum of each operation's roofline time plus the dispatch overhead of `layers` LLM
    layers and `vit_layers` ViT layers."""
    peak, bw = profile.peak(dtype), profile.bandwidth
    attn_peak = {False: profile.attention_peak(dtype), True: profile.attention_peak(dtype, causal=True)}
    rate = profile.elementwise_rate or bw / (3 * DTYPE_BYTES.get(dtype, 4))
    compute = memory = 0.0
    for op in ops:
        if op.elements:
            memory += op.elements / rate
            continue
        t_flops = op.flops / (attn_peak[op.causal] if op.attention else peak)
        t_bytes = op.bytes / bw
        if t_flops >= t_bytes:
            compute += t_flops
        else:
            memory += t_bytes
    overhead = layers * profile.layer_overhead + vit_layers * profile.vit_overhead
    return PhaseTime(compute + memory + overhead, compute, memory, overhead)


# ------------------------------------------------------------------ entry point
def predict(report, profile: DeviceProfile, batch: int = 1, dtype: str | None = None,
            decode_context: int | None = None) -> Latency:
    """Predicted prefill and decode-step latency of a `CostReport`'s policy and baseline.

    `decode_context`: tokens generated before the costed decode step (default: the
    report's). `dtype`: the weights' and activations' dtype (default: the spec's).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    k = constants(report.spec)
    spec = report.spec
    dtype = dtype or spec.dtype
    ctx = (report.decode_context or 0) if decode_context is None else decode_context
    T = report.text_tokens
    fused = profile.fused_attention
    layers = (spec.llm.layers, spec.vit.layers)
    base = (k.base_vit, k.base_proj, k.base_llm)
    pol = (report.vit_tokens, _projector_tokens(report), report.llm_visual)
    prefill_b = roofline(prefill_ops(k, *base, T, batch, fused), profile, dtype, *layers)
    prefill_p = roofline(prefill_ops(k, *pol, T, batch, fused, report.policy.scorers), profile, dtype, *layers)
    decode_b = roofline(decode_ops(k, [T + v + ctx for v in k.base_llm], batch), profile, dtype, spec.llm.layers)
    decode_p = roofline(decode_ops(k, [T + v + ctx for v in report.llm_visual], batch), profile, dtype,
                        spec.llm.layers)
    return Latency(profile.name, dtype, batch, ctx, prefill_b, prefill_p, decode_b, decode_p)


def _projector_tokens(report) -> int:
    k = constants(report.spec)
    return report.policy.projector // k.proj if k.proj else 0
