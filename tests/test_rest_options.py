"""The "what happens to the rest" options (vtdsl/ops/rest/): one module each, one table.

- every option is registered, in the order messages list them, and its parse form,
  canonical text, YAML keys and JSON come back to the same AST;
- JSON written before `Keep.rest` (one field per option) still reads;
- the table loads whichever module is imported first, without torch;
- a new option is one new module: one written here (`then average rest`) parses, formats,
  round-trips through YAML, is checked, costed, listed and run, with no other file touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from vtdsl.lang import format_policy, from_yaml, parse, to_yaml
from vtdsl.lang.ast import Keep, Policy
from vtdsl.ops import rest as rest_options

EXAMPLES = {
    "merge": "at vit.out keep cls top 54 then add rest into 10 by keys",
    "recycle": "at llm.layer3 keep text(all) top 300 then recycle 30% into 9",
    "absorb": "at vit.out keep cls top 25% by outliers then absorb 32",
    "cells": "at vit.out keep cls top 64 then recycle rest into 2x3 cells",
}


def test_the_table_lists_every_option_in_message_order():
    assert list(rest_options.options()) == ["merge", "recycle", "absorb", "cells"]
    for kind, option in rest_options.options().items():
        assert option.model.model_fields["kind"].default == kind
        assert rest_options.by_rule(option.rule) is option


@pytest.mark.parametrize("kind", list(EXAMPLES))
def test_each_option_round_trips_through_text_yaml_and_json(kind: str):
    src = EXAMPLES[kind]
    policy = parse(src)
    rest = policy.stages[0].action.rest
    assert rest.kind == kind and rest_options.by_node(rest).kind == kind
    assert format_policy(policy).strip() == src
    assert from_yaml(to_yaml(policy)) == policy
    data = json.loads(policy.model_dump_json())
    assert data["stages"][0]["action"]["rest"]["kind"] == kind
    assert Policy.model_validate(data) == policy


def test_json_before_rest_still_reads():
    keep = {"kind": "keep", "terms": [{"kind": "top", "score": {"kind": "ref", "name": "cls"}, "qty": {"value": 54}}]}
    old_forms = {
        "merge": {"merge_rest": {"value": 10}, "merge_added": True, "merge_by": "keys", "recycle": None},
        "recycle": {"recycle": {"kind": "recycle", "count": {"value": 30, "percent": True}, "clusters": {"value": 9}}},
        "absorb": {"absorb": {"value": 32}, "merge_added": False},
        "cells": {"cells": {"kind": "cells", "rows": 2, "cols": 3}},
    }
    new = {"merge": "add rest into 10 by keys", "recycle": "recycle 30% into 9", "absorb": "absorb 32",
           "cells": "recycle rest into 2x3 cells"}
    for kind, fields in old_forms.items():
        assert Keep.model_validate({**keep, **fields}) == parse(f"at vit.out keep cls top 54 then {new[kind]}") \
            .stages[0].action
    assert Keep.model_validate({**keep, "merge_rest": None}).rest is None
    with pytest.raises(ValueError, match="a keep takes one of 'merge rest into', 'recycle', 'absorb' and "
                                         "'recycle rest into'"):
        Keep.model_validate({**keep, **old_forms["absorb"], **old_forms["cells"]})
    with pytest.raises(ValueError, match="'add' and 'by keys' belong to 'then merge rest into N'"):
        Keep.model_validate({**keep, "merge_added": True})
    with pytest.raises(ValueError, match="does not match any of the expected tags"):
        Keep.model_validate({**keep, "rest": {"kind": "melt"}})


@pytest.mark.parametrize("first", ["vtdsl.ops.rest.merge", "vtdsl.ops.rest.base", "vtdsl.ops.rest", "vtdsl.lang.ast",
                                   "vtdsl.ir.plan"])
def test_any_module_may_be_imported_first_and_none_needs_torch(first: str):
    code = (f"import sys, importlib; importlib.import_module({first!r})\n"
            "from vtdsl.lang import format_policy, parse, to_yaml, from_yaml\n"
            f"for src in {list(EXAMPLES.values())!r}:\n"
            "    p = parse(src); assert format_policy(p).strip() == src and from_yaml(to_yaml(p)) == p\n"
            "print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# A whole new option in one module: the mean of the tokens the terms dropped, one token.
AVERAGE = '''
from dataclasses import dataclass
from typing import Literal

from vtdsl.lang.ast import Rest
from vtdsl.lang.yaml_keys import YamlKey
from vtdsl.ops.rest.base import RestOption, RestPlan, register


class AverageRest(Rest):
    kind: Literal["average"] = "average"


@dataclass(frozen=True)
class Averaged(RestPlan):
    @property
    def tokens(self):
        return 1

    def listing(self):
        return " then average rest"

    def run(self, x, kept, scores, view):
        import torch

        dropped = torch.ones(x.shape[:2], dtype=torch.bool)
        dropped.scatter_(1, kept, False)
        first = dropped.float().argmax(1, keepdim=True)
        mean = (x * dropped[..., None]).sum(1, keepdim=True) / dropped.sum(1)[:, None, None]
        return torch.cat([x.gather(1, kept[..., None].expand(-1, -1, x.shape[2])), mean], 1), \\
            torch.cat([kept, first], 1)


class AverageOption(RestOption):
    kind, rank, model, rule = "average", 50, AverageRest, "average_rest"
    grammar = "average_rest: _THEN _AVERAGE _REST\\n"
    keywords = {"_AVERAGE": ("average", "'average'")}
    then_words = "'then average rest'"
    phrase = "'average rest'"
    yaml_keys = (YamlKey("average_rest", " then average rest", None),)

    def build(self, b, tree):
        return b.node(AverageRest, b.span(tree))

    def text(self, node):
        return " then average rest"

    def read_yaml(self, reader, m):
        if not reader.is_word(m["average_rest"][1], "true"):
            raise reader.fail("'average_rest' takes true", m["average_rest"][1])
        return reader.node(AverageRest, reader.join(*m["average_rest"]))

    def write_yaml(self, node, item):
        item["average_rest"] = True

    def resolve(self, node, ctx):
        if ctx.leftover < 1:
            ctx.error("'average rest' needs a dropped token", node.span, code="quantity")
            return None
        return Averaged()


OPTION = register(AverageOption())
'''


def test_a_new_option_is_one_module(tmp_path):
    (tmp_path / "average.py").write_text(AVERAGE)
    code = textwrap.dedent(f"""
        import torch
        import vtdsl.ops.rest as rest
        rest.__path__.append({str(tmp_path)!r})
        from vtdsl.compiler.listing import stage_text
        from vtdsl.cost import estimate
        from vtdsl.ir import check
        from vtdsl.lang import PolicyError, format_policy, from_yaml, parse, to_yaml
        src = "at vit.out keep cls top 54 then average rest"
        p = parse(src)
        assert format_policy(p).strip() == src and from_yaml(to_yaml(p)) == p, to_yaml(p)
        assert "average_rest: true" in to_yaml(p)
        try:
            parse("at vit.out keep cls top 54 then")
        except PolicyError as e:
            print(e.diagnostics[0].expected)
        plan = check(src, "tiny-llava")
        print(plan.stages[0].tokens_out, stage_text(plan.stages[0]), estimate(plan).flops > 0)
        x = torch.arange(12.0).view(1, 6, 2)
        out, src_ids = plan.stages[0].rest.run(x, torch.tensor([[0, 2]]), None, None)
        print(out[0, -1].tolist(), src_ids.tolist())
        try:
            check("at vit.out keep cls top 576 then average rest", "tiny-llava")
        except PolicyError as e:
            print(e.diagnostics[0].message)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "'merge', 'recycle', 'absorb', 'average' or 'add'"
    assert lines[1] == "55 keep cls@vit.layer22 top 54 then average rest True"
    # rows 1, 3, 4, 5 of [[0, 1], [2, 3], ...]: their mean, and the first of them
    assert lines[2] == "[6.5, 7.5] [[0, 2, 1]]"
    assert lines[3] == "'average rest' needs a dropped token"
