"""What a compile changed where: a readable listing and its JSON form."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..ir.plan import Plan, ResolvedScore, ResolvedStage
from ..models.spec import ModelSpec


@dataclass(frozen=True)
class Rewrite:
    """One change to the model: where (module path), how (mechanism), and what for."""

    path: str
    mechanism: str  # "fx", "forward-pre-hook", "forward-hook", "method-wrapper"
    what: str

    def to_json(self) -> dict:
        return {"path": self.path, "mechanism": self.mechanism, "what": self.what}


_INDEXED = re.compile(r"^(.*\.)(\d+)(\..*)?$")


def _group_layers(rewrites: list[Rewrite]) -> list[tuple[str, str, str]]:
    """Merge runs of identical rewrites on consecutive layers into ``layers.3..31``."""
    out: list[list] = []  # [prefix, first, last, suffix, mechanism, what] or [path, mechanism, what]
    for r in rewrites:
        m = _INDEXED.match(r.path)
        if m and out and len(out[-1]) == 6:
            prefix, first, last, suffix, mech, what = out[-1]
            if (prefix, suffix or "", mech, what) == (m.group(1), m.group(3) or "", r.mechanism, r.what) and int(
                m.group(2)
            ) == last + 1:
                out[-1][2] = last + 1
                continue
        if m:
            out.append([m.group(1), int(m.group(2)), int(m.group(2)), m.group(3) or "", r.mechanism, r.what])
        else:
            out.append([r.path, r.mechanism, r.what])
    rows = []
    for item in out:
        if len(item) == 6:
            prefix, first, last, suffix, mech, what = item
            index = str(first) if first == last else f"{first}..{last}"
            rows.append((f"{prefix}{index}{suffix}", mech, what))
        else:
            rows.append(tuple(item))
    return rows


def score_text(score: ResolvedScore) -> str:
    if score.op == "leaf":
        o = score.observation
        # the options as the policy writes them (format.py's order), so the listing names the
        # score that runs: `cls(whole)` and `cls(max)` are other scores than `cls`
        heads = [] if o.heads == "mean" else [f"top {o.heads} heads" if isinstance(o.heads, int) else o.heads]
        parts = list(o.args) + heads + ([] if o.rope else ["no_rope"]) + (["image_keys"] if o.image_keys else [])
        args = f"({', '.join(parts)})" if parts else ""
        return f"{o.scorer}{args}@{o.tower}.layer{o.layer}"
    weights = score.weights or (1,) * len(score.args)
    return f"{score.op}(" + ", ".join(("" if w == 1 else f"{w:g} * ") + score_text(a)
                                      for w, a in zip(weights, score.args)) + ")"


def stage_text(stage: ResolvedStage) -> str:
    """The resolved action, e.g. ``keep cls@vit.layer1 top 8 then merge rest into 2``."""
    return _action_text(stage) + (" renumber" if stage.renumber else "")


def _rule_text(rule) -> str:
    """An adaptive count's rule as the policy writes it."""
    if rule.kind == "outliers":
        return "outliers"
    if rule.kind == "lof":
        return f"lof({rule.neighbours}, rest)" if rule.of_rest else f"lof({rule.neighbours})"
    return f"entropy({score_text(rule.score)}) over {rule.steps} layer{'s' if rule.steps != 1 else ''}"


def _region_text(stage: ResolvedStage) -> str:
    if stage.region is None:
        return ""
    kind, rows, cols = stage.region
    below = f" below {stage.below:g}" if stage.below is not None else ""
    text = {"crop": " per crop", "frame": f" per frame ({rows} frames)",
            "window": f" per window {rows}", "segment": f" per segment {rows}{below}"}.get(
        kind, f" per region {rows}x{cols}")
    if stage.region_softmax is not None:
        return text + f" softmax {stage.region_softmax:g}"
    return text + (" proportional" if stage.region_proportional else "")


def _action_text(stage: ResolvedStage) -> str:
    if stage.action == "drop":
        return "drop all"
    if stage.action == "pool":
        return f"pool {stage.pool[0]}x{stage.pool[1]}"
    if stage.action == "merge":
        return f"merge {stage.merge_rest}"
    if stage.action == "static":
        return f"merge static {stage.merge_rest}{_region_text(stage)}"
    parts = ["cls_token"] if stage.keep_cls else []
    for term in stage.terms:
        if term.kind == "top" and term.adaptive is not None:
            rule = term.adaptive
            parts.append(f"{score_text(term.score)} top {rule.bound} by {_rule_text(rule)}")
        elif term.kind == "top":
            parts.append(f"{score_text(term.score)} top {term.count}")
        elif term.kind == "far":
            text = f"far{'(norm)' if term.normed else ''} {term.count}"
            if term.text_pivots:
                text += f" with {term.text_pivots} text pivots by {score_text(term.pivot_score)}"
            parts.append(text)
        elif term.kind == "diverse" and term.spread == "sum":
            parts.append(f"diverse(sum) {term.count}")
        elif term.kind == "random" and term.seed is not None:
            parts.append(f"random {term.count} seed {term.seed}")
        else:
            parts.append(f"{term.kind} {term.count}")
    text = "keep " + " + ".join(parts)
    text += _region_text(stage)
    if stage.rest is not None:
        text += stage.rest.listing()
    return text


def stage_module_path(stage: ResolvedStage, spec: ModelSpec) -> str:
    """The module whose input the stage changes."""
    site = stage.site
    if site.tower == "vit":
        return spec.projector_path if site.layer is None else spec.vit_layer_path.format(i=site.layer)
    return spec.llm_layer_path.format(i=site.layer)


@dataclass
class Listing:
    plan: Plan
    model_class: str
    rewrites: list[Rewrite] = field(default_factory=list)
    fx_code: dict[str, str] = field(default_factory=dict)  # module path -> generated code
    mechanism: dict[str, str] = field(default_factory=dict)  # tower -> "fx" | "hooks" | "none"

    def add(self, path: str, mechanism: str, what: str) -> None:
        self.rewrites.append(Rewrite(path, mechanism, what))

    def stages(self) -> list[dict]:
        spec = self.plan.spec
        return [
            {
                "index": s.index,
                "site": s.site.text(),
                "module": stage_module_path(s, spec),
                "action": stage_text(s),
                "tokens_in": s.tokens_in,
                "tokens_out": s.tokens_out,
                "fewest_in": s.fewest_in,
                "fewest_out": s.fewest_out,
            }
            for s in self.plan.stages
        ]

    def to_json(self) -> dict:
        return {
            "mechanism": dict(self.mechanism),
            "rewrites": [r.to_json() for r in self.rewrites],
            "fx": dict(self.fx_code),
        }

    def text(self) -> str:
        plan = self.plan
        name = plan.policy.name or "<unnamed>"
        lines = [f"vtdsl compile: policy {name!r} on {plan.spec.name} ({self.model_class})", ""]
        lines.append("stages (visual tokens per image, in -> out):")
        if not plan.stages:
            lines.append("  (none: the model is unchanged)")
        for s in self.stages():
            lines.append(
                f"  [{s['index']}] {s['site']:<14} {s['module']:<44} "
                f"{_range(s['fewest_in'], s['tokens_in']):>6} -> {_range(s['fewest_out'], s['tokens_out']):<6} "
                f"{s['action']}"
            )
        lines.append("")
        lines.append(
            f"visual tokens: projector {plan.projector_tokens}, LLM per layer "
            + (", ".join(str(v) for v in plan.llm_visual) if plan.llm_visual else "-")
        )
        lines.append("mechanism: " + ", ".join(f"{k} = {v}" for k, v in self.mechanism.items()))
        lines.append("")
        lines.append("rewrites (module path, mechanism, purpose):")
        if not self.rewrites:
            lines.append("  (none)")
        grouped = _group_layers(self.rewrites)
        width = max((len(path) for path, _, _ in grouped), default=0)
        for path, mechanism, what in grouped:
            lines.append(f"  {path:<{width}}  {mechanism:<17} {what}")
        for path, code in self.fx_code.items():
            lines.append("")
            lines.append(f"fx graph of {path}:")
            lines.extend("  " + line for line in code.strip("\n").splitlines())
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.text()


def _range(fewest: int, most: int) -> str:
    """`576`, or `64..576` when an adaptive count makes it vary per call."""
    return str(most) if fewest == most else f"{fewest}..{most}"
