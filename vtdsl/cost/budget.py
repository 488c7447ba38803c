"""Budget verdicts: does a cost report meet `budget <metric> <op> <value>` constraints?

Metrics (the same names as the language's `budget` statement):
- `flops`        total prefill FLOPs in the hf convention (scorer extras included)
- `flops_fastv`  FastV's LLM-only FLOPs
- `tokens`       visual tokens entering the LLM (`visual_tokens_to_llm`)
- `kv`           KV-cache bytes after prefill
- `latency`, `decode_latency`  predicted seconds of the prefill / of one decode step on a
                 device profile (`vtdsl check --device NAME`; vtdsl.cost.latency)

A percent value is relative to the unpruned model; any other value is absolute (FLOPs,
tokens, bytes).
"""

from __future__ import annotations

import math
import re
from typing import Iterable

from pydantic import ValidationError

from ..lang.ast import Budget
from ..lang.errors import Diagnostic, PolicyError, did_you_mean

METRICS = ("flops", "flops_fastv", "tokens", "kv", "latency", "decode_latency")
LATENCY_METRICS = ("latency", "decode_latency")
_EXPECTED = (
    "METRIC <= VALUE[%] with METRIC one of flops, flops_fastv, tokens, kv, latency, decode_latency; "
    "e.g. 'flops <= 25%', 'tokens <= 144', 'kv < 2GiB', 'flops <= 3.5T', 'latency <= 120ms'"
)
_BUDGET = re.compile(
    r"^\s*(?:budget\s+)?(?P<metric>[A-Za-z_][A-Za-z_0-9]*)\s*(?P<op><=|=<|<|≤)\s*"
    r"(?P<num>(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>\S*)\s*$"
)
_UNIT = re.compile(r"^(?P<prefix>[kKMGTP]?)(?P<binary>i?)(?P<suffix>B|FLOPs?|flops?)?$")
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_SCALE = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"k": 2**10, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def budget_text(budget: Budget) -> str:
    """The constraint as written in a policy, e.g. `flops <= 25%`."""
    value = budget.value
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"{budget.metric} {budget.op} {shown}{'%' if budget.percent else ''}"


def _bad(text: str, message: str, hint: str | None = None) -> PolicyError:
    return PolicyError(Diagnostic(f"bad budget {text!r}: {message}", expected=_EXPECTED, hint=hint, code="budget"))


def parse_budget(text: str) -> Budget:
    """Parse a command-line budget such as `"flops <= 25%"` into a `Budget` node.

    Accepts the language's `budget` syntax (`metric <=|< NUMBER[%]`, optionally preceded
    by `budget`) plus, for the command line, an SI suffix (k, M, G, T, P; `Ki`, `Mi`,
    `Gi`, `Ti` binary) and, for `kv` (bytes), a `B`. `%` is relative to the unpruned model.
    """
    m = _BUDGET.match(text)
    if not m:
        return _raise_unparsable(text)
    metric = m["metric"]
    if metric not in METRICS:
        raise _bad(text, f"unknown metric {metric!r}", did_you_mean(metric, METRICS))
    op = "<" if m["op"] == "<" else "<="
    value = float(m["num"].replace("_", ""))
    unit = m["unit"]
    percent = unit == "%"
    if unit in _SECONDS:
        if metric not in LATENCY_METRICS:
            raise _bad(text, f"'{unit}' is a time; only latency and decode_latency are measured in seconds")
        value *= _SECONDS[unit]
    elif unit and not percent:
        u = _UNIT.match(unit)
        if not u or (u["binary"] and not u["prefix"]):
            raise _bad(text, f"unknown unit {unit!r}",
                       "units: %, k, M, G, T, P, Ki, Mi, Gi (and B for kv; s, ms, us for latency)")
        suffix = (u["suffix"] or "").lower()
        if suffix == "b" and metric != "kv":
            raise _bad(text, f"'{unit}' is a byte count; only 'kv' is measured in bytes")
        if suffix.startswith("flop") and not metric.startswith("flops"):
            raise _bad(text, f"'{unit}' is a FLOP count; '{metric}' is not")
        value *= _BINARY[u["prefix"]] if u["binary"] else _SCALE[u["prefix"]]
    if not math.isfinite(value):
        raise _bad(text, "the value must be a finite number")
    number: int | float = int(value) if value.is_integer() else value
    try:
        return Budget(metric=metric, op=op, value=number, percent=percent)
    except ValidationError as err:  # the AST's own limits (0..100%, ...)
        message = err.errors()[0].get("msg", str(err)).removeprefix("Value error, ")
        raise _bad(text, message) from None


def _raise_unparsable(text: str):
    words = re.findall(r"[A-Za-z_]+", text)
    hint = did_you_mean(words[0], METRICS) if words and words[0] not in METRICS + ("budget",) else None
    raise _bad(text, "cannot read it", hint)


def verdicts(report, budgets: Iterable[Budget], latency=None) -> list[dict]:
    """One verdict per budget: {constraint, metric, value, limit, baseline, ok}.

    `value` is the policy's figure, `limit` the absolute limit (a percent budget is
    `baseline · value / 100`); comparisons with percentages are done without rounding.
    The verdicts are in the order of `budgets` (pair them up for source spans).
    `latency` (a `vtdsl.cost.latency.Latency`) judges the latency metrics; without it
    they are a PolicyError naming the device option.
    """
    out = []
    for budget in budgets:
        if budget.metric in LATENCY_METRICS:
            if latency is None:
                raise PolicyError(Diagnostic(
                    f"budget '{budget_text(budget)}' is a predicted time, which needs a device profile",
                    budget.span, expected="--device NAME (a GPU such as h100, or cpu after `vtdsl calibrate`)",
                    code="budget"))
            value, baseline = latency.metric(budget.metric)
        else:
            value, baseline = report.metric(budget.metric)
        if budget.percent:
            limit = baseline * budget.value / 100
            lhs, rhs = value * 100, baseline * budget.value  # exact for integer counts
        else:
            limit = budget.value
            lhs, rhs = value, budget.value
        ok = lhs < rhs if budget.op == "<" else lhs <= rhs
        out.append(
            {
                "constraint": budget_text(budget),
                "metric": budget.metric,
                "value": value,
                "limit": limit,
                "baseline": baseline,
                "percent_of_baseline": 100 * value / baseline if baseline else None,
                "ok": bool(ok),
            }
        )
    return out


def over_budget(report, budgets: Iterable[Budget]) -> list[dict]:
    """The verdicts that fail (empty when every budget is met)."""
    return [v for v in verdicts(report, budgets) if not v["ok"]]
