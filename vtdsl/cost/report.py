"""`CostReport`: a policy's costs next to the unpruned model's, and their ratios."""

from __future__ import annotations

from .conventions import CONVENTIONS, Convention, evaluate, get_convention
from .model import PARTS, Side, constants, decode_selected, observation_flops, rater_flops, stage_flops


def _ratio(policy, baseline):
    return policy / baseline if baseline else None


def _fmt_flops(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}FLOPs"
    return f"{x:.0f} FLOPs"


def _fmt_bytes(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.0f} B"


class CostReport:
    """Costs per image of one prefill (+ one decode step), baseline vs policy.

    `baseline` / `policy` are `Side`s: `.vit .projector .llm .lm_head .scorers` (hf FLOPs),
    `.flops` (their sum), `.fastv`, `.kv_bytes`, `.decode`, `.visual`.
    """

    __slots__ = (
        "spec", "text_tokens", "logits", "decode_context", "baseline", "policy",
        "vit_tokens", "llm_visual", "observations", "stages", "extra_flops", "decode_selection",
    )

    def __init__(
        self, spec, text_tokens, logits, decode_context, baseline: Side, policy: Side,
        vit_tokens, llm_visual, observations=(), stages=(), extra_flops=0,
    ):
        self.spec, self.text_tokens, self.logits, self.decode_context = spec, text_tokens, logits, decode_context
        self.baseline, self.policy = baseline, policy
        self.vit_tokens, self.llm_visual = vit_tokens, llm_visual
        self.observations, self.stages, self.extra_flops = observations, stages, extra_flops
        self.decode_selection = None  # a plan's DecodeSelection (`vtdsl.cost.estimate` sets it)

    @property
    def decode_selected(self) -> int | None:
        """One decode step's FLOPs under the plan's decode stage (None without one): layers
        N.. attend to k visual entries instead of all (docs/cost-model.md)."""
        sel = self.decode_selection
        if sel is None:
            return None
        return decode_selected(self.spec, self.policy.decode, self.llm_visual, self.text_tokens,
                               self.decode_context or 0, sel.layer, sel.k)

    # -- headline figures
    @property
    def flops(self) -> int:
        return self.policy.flops

    @property
    def flops_ratio(self) -> float:
        """Policy over unpruned prefill FLOPs (`hf` convention): below 1 the policy saves."""
        return self.policy.flops / self.baseline.flops

    @property
    def fastv_ratio(self) -> float:
        """The same ratio in FastV's convention (LLM layers only)."""
        return self.policy.fastv / self.baseline.fastv

    @property
    def kv_ratio(self) -> float:
        """Policy over unpruned KV-cache bytes after prefill."""
        return self.policy.kv_bytes / self.baseline.kv_bytes

    @property
    def visual_tokens_to_llm(self) -> int:
        return self.policy.visual

    def metric(self, name: str) -> tuple[float, float]:
        """(policy, baseline) of a budget metric: flops, flops_fastv, tokens or kv."""
        p, b = self.policy, self.baseline
        if name == "flops":
            return p.flops, b.flops
        if name == "flops_fastv":
            return p.fastv, b.fastv
        if name == "tokens":
            return p.visual, b.visual
        if name == "kv":
            return p.kv_bytes, b.kv_bytes
        raise ValueError(f"unknown cost metric {name!r}")

    # -- other counting conventions (vtdsl.cost.conventions), on demand
    def convention(self, conv: "str | Convention", newlines: bool = True) -> dict:
        """{baseline, policy, ratio} of this report in one convention (a name of
        `CONVENTIONS` or a `Convention`); `newlines=False` counts LLaVA-NeXT without its
        newline tokens."""
        if isinstance(conv, str):
            conv = get_convention(conv)
        k = constants(self.spec)
        T, logits = self.text_tokens, self.logits
        b = evaluate(conv, self.spec, self.baseline, k.base_llm, T, logits, newlines)
        p = evaluate(conv, self.spec, self.policy, self.llm_visual, T, logits, newlines)
        return {"baseline": b, "policy": p, "ratio": _ratio(p, b)}

    def conventions(self, newlines: bool = True) -> dict[str, dict]:
        """Every row of `CONVENTIONS`, by name."""
        return {name: self.convention(conv, newlines) for name, conv in CONVENTIONS.items()}

    # -- detail, computed on demand (not on the fast path)
    def scorer_items(self) -> list[dict]:
        """Each observation's and stage's counted extra FLOPs."""
        k = constants(self.spec)
        items = []
        raters = rater_flops(k, self.observations, self.llm_visual, self.text_tokens)
        if raters:
            items.append({"what": "text raters (visual x text tokens at the LLM input)", "flops": raters})
        for obs in self.observations:
            site = f"{obs.tower}.layer{obs.layer}"
            what = f"{obs.scorer}({', '.join(obs.args)}) @ {site}, queries={obs.queries}"
            items.append({"what": what, "flops": observation_flops(k, obs, self.vit_tokens, self.llm_visual, self.text_tokens)})
        for stage in self.stages:
            f = stage_flops(k, stage)
            if f:
                items.append({"what": f"stage {stage.index} ({stage.action}) at {stage.site.text()}", "flops": f})
        if self.extra_flops:
            items.append({"what": "extra", "flops": self.extra_flops})
        return items

    def unused_vit_flops(self) -> int:
        """FLOPs of ViT layers that run but feed nothing (after the feature layer)."""
        k = constants(self.spec)
        total = 0
        for i in self.spec.unused_vit_layers:
            total += k.vit_layer(i, self.vit_tokens[i])
        return total * k.crops

    def notes(self) -> list[str]:
        out = []
        unused = self.spec.unused_vit_layers
        if unused:
            layers = ", ".join(str(i) for i in unused)
            out.append(
                f"ViT layer(s) {layers} run but their output is unused (vision_feature_layer "
                f"{self.spec.vision_feature_layer}): {_fmt_flops(self.unused_vit_flops())} of the ViT's "
                f"{_fmt_flops(self.policy.vit)} are counted because transformers computes them"
            )
        return out

    def to_json(self) -> dict:
        b, p = self.baseline, self.policy
        L = len(self.llm_visual)
        return {
            "model": self.spec.name,
            "text_tokens": self.text_tokens,
            "logits": self.logits,
            "visual_tokens_to_llm": p.visual,
            "visual_tokens_baseline": b.visual,
            "visual_tokens_mean_llm": sum(self.llm_visual) / L if L else 0.0,
            "flops": {
                "baseline": b.flops,
                "policy": p.flops,
                "ratio": _ratio(p.flops, b.flops),
                "by_part": {
                    part: {
                        "baseline": getattr(b, part),
                        "policy": getattr(p, part),
                        "ratio": _ratio(getattr(p, part), getattr(b, part)),
                    }
                    for part in PARTS
                },
            },
            "flops_fastv": {"baseline": b.fastv, "policy": p.fastv, "ratio": _ratio(p.fastv, b.fastv)},
            "kv_cache_bytes": {"baseline": b.kv_bytes, "policy": p.kv_bytes, "ratio": _ratio(p.kv_bytes, b.kv_bytes)},
            "decode_flops_per_token": {
                "context": self.decode_context,
                "baseline": b.decode,
                "policy": p.decode,
                "ratio": _ratio(p.decode, b.decode),
                **self._decode_selected_json(),
            },
            "scorers": self.scorer_items(),
            "conventions": self.conventions(),
            "notes": self.notes(),
        }

    def _decode_selected_json(self) -> dict:
        selected = self.decode_selected
        if selected is None:
            return {}
        # top-p: the count varies per step, so the figure is its bound (every visual entry)
        return {"selected": selected, "selected_ratio": _ratio(selected, self.policy.decode),
                "selection": self.decode_selection.text, "selected_is_bound": self.decode_selection.mass is not None}

    def per_layer(self) -> dict[str, list[int]]:
        """`hf` FLOPs of every ViT and LLM layer of the policy (for plots and debugging)."""
        k = constants(self.spec)
        T = self.text_tokens
        vit = [k.crops * k.vit_layer(i, n) for i, n in enumerate(self.vit_tokens)]
        llm = [k.llm_lin * (T + v) + k.llm_att * (T + v) * (T + v) for v in self.llm_visual]
        return {"vit": vit, "llm": llm}

    def summary(self) -> str:
        """A few human-readable lines."""
        b, p = self.baseline, self.policy
        lines = [
            f"model {self.spec.name}: {p.visual}/{b.visual} visual tokens enter the LLM, "
            f"{self.text_tokens} text tokens, logits={self.logits}",
            f"FLOPs (hf)    {_fmt_flops(p.flops)} / {_fmt_flops(b.flops)} = {100 * p.flops / b.flops:.2f}%",
            f"FLOPs (fastv) {_fmt_flops(p.fastv)} / {_fmt_flops(b.fastv)} = {100 * p.fastv / b.fastv:.2f}%",
            f"KV cache      {_fmt_bytes(p.kv_bytes)} / {_fmt_bytes(b.kv_bytes)} = {100 * p.kv_bytes / b.kv_bytes:.2f}%",
        ]
        parts = ", ".join(f"{part} {_fmt_flops(getattr(p, part))}" for part in PARTS if getattr(p, part))
        lines.append(f"by part: {parts}")
        selected = self.decode_selected
        if selected is not None:
            lines.append(f"decode FLOPs/token (context +{self.decode_context or 0}) {_fmt_flops(selected)} with "
                         f"'{self.decode_selection.text}' / {_fmt_flops(p.decode)} without = "
                         f"{100 * selected / p.decode:.2f}%")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"CostReport({self.spec.name}: flops {self.flops_ratio:.4f}, fastv {self.fastv_ratio:.4f}, "
            f"kv {self.kv_ratio:.4f}, visual {self.policy.visual}/{self.baseline.visual})"
        )


__all__ = ["CostReport", "average_conventions"]


def average_conventions(reports, newlines: bool = True) -> dict[str, dict]:
    """Every convention over several reports of one plan (one per prompt length): the
    mean baseline and policy figures, and the mean of the per-report ratios (DivPrune's
    script averages its ratios per benchmark the same way)."""
    per = [r.conventions(newlines) for r in reports]
    n = len(per)
    out = {}
    for name in CONVENTIONS:
        rows = [p[name] for p in per]
        ratios = [r["ratio"] for r in rows]
        out[name] = {
            "baseline": sum(r["baseline"] for r in rows) / n if n > 1 else rows[0]["baseline"],
            "policy": sum(r["policy"] for r in rows) / n if n > 1 else rows[0]["policy"],
            "ratio": None if None in ratios else sum(ratios) / n,
        }
    return out
