"""The YAML form of a policy: same AST, for tools that generate or edit policies.

Schema (every key optional except a stage's `at` and its one action):

    policy: design                 # the name (a string)
    model: llava-1.5-7b            # a string
    budget:                        # one budget or a list; each as after `budget` in .vt
      - flops <= 25%
      - tokens <= 64
    stages:                        # a list; each stage is `at` plus exactly one action
      - at: vit.layer16
        keep:                      # a list of terms, or one string with `+`
          - anchors top 10%
          - buffers
      - at: llm.layer2
        keep: diverse 64
        per: region 2x2            # keep only: `crop` or `region RxC`
        merge_rest_into: 16        # keep only: `then merge rest into 16` (add_rest_into: `then add rest ...`;
        merge_by: keys             #   with `merge_by: keys`, `... by keys`)
      - at: llm.layer3             # keep only: `then recycle 83 into 9`
        keep: text(all) top 300
        recycle: 83
        recycle_into: 9
      - at: vit.out                # keep only: `then recycle rest into 2x2 cells`
        keep: cls top 64
        recycle_cells: 2x2
      - {at: llm.layer8, merge: 32}
      - {at: vit.out, pool: 2x2}
      - {at: llm.layer20, drop: all}
      - {every: 2, from: vit.layer2, to: vit.layer22, keep: cls top 80%}   # a schedule

Each value is written exactly as the matching piece of a `.vt` stage and is parsed by the
same grammar (from a sub-rule), so errors inside a value point into the YAML file with
the same messages. The file is read with PyYAML's safe loader (composed into nodes, which
carry line/column marks); anchors/aliases and duplicate keys are refused.
"""

from __future__ import annotations

import re

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import ast
from .errors import Diagnostic, PolicyError, did_you_mean
from .format import format_budget_body, format_number, format_region, format_term
from .parser import _StatementError, _Where, check_size, has_surrogate, parse_value

TOP_KEYS = ("policy", "model", "budget", "stages")
ACTIONS = ("keep", "merge", "pool", "drop")
STAGE_KEYS = ("at", "every", "from", "to") + ACTIONS + ("per", "merge_rest_into", "add_rest_into", "merge_by",
                                                        "recycle", "recycle_into", "absorb", "recycle_cells",
                                                        "renumber")
_NULL = "tag:yaml.org,2002:null"


# ---------------------------------------------------------------------------------------
# AST -> YAML


class _Dumper(yaml.SafeDumper):
    """Indents list items under their key (`stages:\\n  - at: ...`)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, text: str):
    # Invisible characters (NEL, U+2028, BOM, controls) are only safe escaped inside a
    # double-quoted scalar; YAML readers fold or strip them anywhere else.
    style = '"' if any(not c.isprintable() for c in text) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def _qty(q: ast.Quantity) -> int | str:
    if q.percent:
        return format_number(q.value) + "%"
    return int(q.value)


def policy_to_data(policy: ast.Policy) -> dict:
    data: dict = {}
    if policy.name is not None:
        data["policy"] = policy.name
    if policy.model is not None:
        data["model"] = policy.model
    if policy.budgets:
        data["budget"] = [format_budget_body(b) for b in policy.budgets]
    stages = []
    for stage in policy.stages:
        if stage.repeat is not None:
            item: dict = {"every": stage.repeat.step, "from": stage.site.text(), "to": stage.repeat.end.text()}
        else:
            item = {"at": stage.site.text()}
        a = stage.action
        if isinstance(a, ast.Keep):
            item["keep"] = [format_term(t) for t in a.terms]
            if a.region is not None:
                item["per"] = format_region(a.region)
            if a.merge_rest is not None:
                item["add_rest_into" if a.merge_added else "merge_rest_into"] = _qty(a.merge_rest)
                if a.merge_by == "keys":
                    item["merge_by"] = "keys"
            if a.absorb is not None:
                item["absorb"] = _qty(a.absorb)
            if a.recycle is not None:
                item["recycle"] = _qty(a.recycle.count)
                item["recycle_into"] = _qty(a.recycle.clusters)
            if a.cells is not None:
                item["recycle_cells"] = f"{a.cells.rows}x{a.cells.cols}"
        elif isinstance(a, ast.Merge):
            item["merge"] = _qty(a.pairs)
        elif isinstance(a, ast.Pool):
            item["pool"] = f"{a.rows}x{a.cols}"
        else:
            item["drop"] = "all"
        if stage.renumber:
            item["renumber"] = True
        stages.append(item)
    data["stages"] = stages
    return data


def to_yaml(policy: ast.Policy) -> str:
    """The canonical YAML text of a policy (no comments)."""
    return yaml.dump(
        policy_to_data(policy), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
        allow_unicode=True, width=1 << 30,
    )


# ---------------------------------------------------------------------------------------
# YAML -> AST


def _span(node: Node) -> ast.Span:
    s, e = node.start_mark, node.end_mark
    end_col = e.column if e.line > s.line or e.column > s.column else s.column + 1
    return ast.Span(line=s.line + 1, column=s.column + 1, end_line=e.line + 1, end_column=max(end_col, 1))


def _join(a: ast.Span, b: ast.Span) -> ast.Span:
    return ast.Span(line=a.line, column=a.column, end_line=b.end_line, end_column=b.end_column)


class _Reader:
    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename
        self.seen: set[int] = set()
        self.diagnostics: list[Diagnostic] = []

    def fail(self, message: str, node: Node | None, *, expected: str | None = None,
             hint: str | None = None) -> _StatementError:
        span = _span(node) if node is not None else None
        return _StatementError(Diagnostic(message, span, expected=expected, hint=hint, code="yaml"))

    def visit(self, node: Node) -> Node:
        if id(node) in self.seen:
            raise self.fail("YAML anchors and aliases are not supported in policies", node,
                            hint="write the value out again")
        self.seen.add(id(node))
        return node

    def mapping(self, node: Node, what: str, keys: tuple[str, ...]) -> dict[str, tuple[ScalarNode, Node]]:
        if not isinstance(node, MappingNode):
            raise self.fail(f"{what} must be a mapping with keys {', '.join(keys)}", node)
        out: dict[str, tuple[ScalarNode, Node]] = {}
        for key, value in node.value:
            self.visit(key)
            self.visit(value)
            if not isinstance(key, ScalarNode):
                raise self.fail(f"a key in {what} must be a plain word", key)
            name = key.value
            if name not in keys:
                raise self.fail(f"unknown key '{name[:40]}' in {what}", key, expected=", ".join(keys),
                                hint=did_you_mean(name[:64], keys))
            if name in out:
                raise self.fail(f"duplicate key '{name}' in {what} (first on line "
                                f"{out[name][0].start_mark.line + 1})", key)
            out[name] = (key, value)
        return out

    def string(self, node: Node, what: str) -> str:
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            raise self.fail(f"{what} must be a string", node, hint='quote it: "..."')
        if has_surrogate(node.value):
            raise self.fail(f"{what} holds a lone surrogate escape, which is not a character", node)
        return node.value

    def value(self, node: Node, start: str, what: str):
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            raise self.fail(f"{what} must be a single value", node, hint=_VALUE_HINTS.get(start))
        s = node.start_mark
        column = s.column + 1 + (1 if node.style in ("'", '"') else 0)
        if node.style in ("|", ">"):
            column = s.column + 1
        where = _Where(self.filename, self.text, line=s.line + 1, column=column, end_words="the end of the value")
        return parse_value(node.value, start, where)

    # -- the document -------------------------------------------------------------------
    def policy(self, root: Node | None) -> ast.Policy:
        if root is None:
            return ast.Policy(span=ast.Span(line=1, column=1, end_line=1, end_column=1))
        self.visit(root)
        top = self.mapping(root, "a YAML policy", TOP_KEYS)
        fields: dict = {}
        for key in ("policy", "model"):
            if key in top:
                fields["name" if key == "policy" else "model"] = self.guard(
                    lambda k=key: self.string(top[k][1], f"'{k}'"))
        if "model" in top:
            fields["model_span"] = _span(top["model"][0])
        budgets = []
        if "budget" in top:
            node = top["budget"][1]
            items = self.items(node) if isinstance(node, SequenceNode) else [node]
            budgets = [self.guard(lambda n=n: self.budget(n)) for n in items]
        stages = []
        if "stages" in top:
            node = top["stages"][1]
            if not isinstance(node, SequenceNode):
                self.diagnostics.append(self.fail("'stages' must be a list", node).diagnostic)
            else:
                stages = [self.guard(lambda n=n: self.stage(n)) for n in self.items(node)]
        if self.diagnostics:
            raise PolicyError(self.diagnostics, source=self.text, filename=self.filename)
        return ast.Policy(**fields, budgets=budgets, stages=stages, span=_span(root))

    def guard(self, fn):
        try:
            return fn()
        except _StatementError as err:
            self.diagnostics.append(err.diagnostic)
            return None

    def items(self, node: SequenceNode) -> list[Node]:
        return [self.visit(n) for n in node.value]

    def budget(self, node: Node) -> ast.Budget:
        b = self.value(node, "budget_body", "a budget")
        return b.model_copy(update={"span": _span(node)})

    def stage(self, node: Node) -> ast.Stage:
        m = self.mapping(node, "a stage", STAGE_KEYS)
        repeat = None
        if any(k in m for k in ("every", "from", "to")):
            if "at" in m:
                raise self.fail("a stage has 'at' or a schedule ('every', 'from', 'to'), not both", m["at"][0])
            for k in ("from", "to"):
                if k not in m:
                    raise self.fail(f"a schedule needs '{k}: <site>'", node, expected="from: vit.layer2, to: vit.layer22")
            step = 1
            if "every" in m:
                val = m["every"][1]
                if not (isinstance(val, ScalarNode) and re.fullmatch(r"[0-9]{1,6}", val.value)
                        and 1 <= int(val.value) <= ast.MAX_LAYER):
                    raise self.fail("'every' takes a whole number of layers, 1 or more", val, hint="write 'every: 2'")
                step = int(val.value)
            end = self.value(m["to"][1], "site", "'to'")
            repeat = self.node(ast.Repeat, _join(_span(m["from"][0]), _span(m["to"][1])), step=step, end=end)
            m = dict(m)
            m["at"] = m["from"]
            site = self.value(m["from"][1], "site", "'from'")
        elif "at" not in m:
            raise self.fail("a stage needs 'at: <site>'", node, expected="a site such as vit.layer16")
        actions = [k for k in ACTIONS if k in m]
        if not actions:
            raise self.fail("a stage needs an action", node, expected="one of keep, merge, pool or drop")
        if len(actions) > 1:
            raise self.fail(f"a stage has one action, got {' and '.join(actions)}", m[actions[1]][0],
                            hint="write a second stage at the same site")
        action = actions[0]
        for extra in ("per", "merge_rest_into", "add_rest_into", "merge_by", "recycle", "recycle_into", "absorb",
                      "recycle_cells"):
            if extra in m and action != "keep":
                raise self.fail(f"'{extra}' belongs to 'keep', not to '{action}'", m[extra][0])
        if repeat is None:
            site = self.value(m["at"][1], "site", "'at'")
        key, val = m[action]
        span = _join(_span(key), _span(val))
        if action == "keep":
            if isinstance(val, SequenceNode):
                nodes = self.items(val)
                if not nodes:
                    raise self.fail("'keep' needs at least one term", val,
                                    expected="a term such as 'cls top 10%', 'diverse 64' or 'buffers'")
                terms = [self.value(n, "term", "a term") for n in nodes]
            else:
                terms = self.value(val, "terms", "'keep'")
            region = merge_rest = None
            if "per" in m:
                region = self.value(m["per"][1], "region_body", "'per'")
            merge_added, merge_by = False, "tokens"
            if "merge_rest_into" in m and "add_rest_into" in m:
                raise self.fail("a keep either merges or adds the rest, not both", m["add_rest_into"][0],
                                expected="one of merge_rest_into or add_rest_into")
            if "merge_rest_into" in m:
                merge_rest = self.value(m["merge_rest_into"][1], "quantity", "'merge_rest_into'")
            if "add_rest_into" in m:
                merge_rest = self.value(m["add_rest_into"][1], "quantity", "'add_rest_into'")
                merge_added = True
            if "merge_by" in m:
                key, val = m["merge_by"]
                if merge_rest is None:
                    raise self.fail("'merge_by' belongs to merge_rest_into or add_rest_into", key,
                                    expected="merge_rest_into: N beside it")
                if not (isinstance(val, ScalarNode) and val.value == "keys"):
                    raise self.fail("'merge_by' takes 'keys'", val, expected="merge_by: keys")
                merge_by = "keys"
            recycle = None
            if ("recycle" in m) != ("recycle_into" in m):
                have, missing = ("recycle", "recycle_into") if "recycle" in m else ("recycle_into", "recycle")
                raise self.fail(f"'{have}' needs '{missing}' beside it", m[have][0],
                                expected="recycle: N and recycle_into: M (`then recycle N into M`)")
            if "recycle" in m:
                if merge_rest is not None:
                    raise self.fail("a keep either merges the rest or recycles some of it, not both",
                                    m["recycle"][0], expected="one of merge_rest_into or recycle")
                count = self.value(m["recycle"][1], "quantity", "'recycle'")
                clusters = self.value(m["recycle_into"][1], "quantity", "'recycle_into'")
                recycle = self.node(ast.Recycle, _join(_span(m["recycle"][0]), _span(m["recycle_into"][1])),
                                    count=count, clusters=clusters)
            absorb = self.value(m["absorb"][1], "quantity", "'absorb'") if "absorb" in m else None
            if absorb is not None and (merge_rest is not None or recycle is not None):
                raise self.fail("a keep takes one of 'merge_rest_into', 'recycle' and 'absorb'", m["absorb"][0],
                                expected="one of them")
            cells = None
            if "recycle_cells" in m:
                if merge_rest is not None or recycle is not None or absorb is not None:
                    raise self.fail("a keep takes one of 'merge_rest_into', 'recycle', 'absorb' and 'recycle_cells'",
                                    m["recycle_cells"][0], expected="one of them")
                rows, cols = self.value(m["recycle_cells"][1], "grid", "'recycle_cells'")
                cells = self.node(ast.Cells, _join(_span(m["recycle_cells"][0]), _span(m["recycle_cells"][1])),
                                  rows=rows, cols=cols)
            last = max((m[k][1] for k in ("keep", "per", "merge_rest_into", "add_rest_into", "merge_by", "recycle",
                                          "recycle_into", "absorb", "recycle_cells") if k in m),
                       key=lambda n: (n.end_mark.line, n.end_mark.column))
            act = self.node(ast.Keep, _join(_span(key), _span(last)), terms=terms, region=region,
                            merge_rest=merge_rest, recycle=recycle, absorb=absorb, cells=cells,
                            merge_added=merge_added, merge_by=merge_by)
        elif action == "merge":
            act = self.node(ast.Merge, span, pairs=self.value(val, "quantity", "'merge'"))
        elif action == "pool":
            rows, cols = self.value(val, "grid", "'pool'")
            act = self.node(ast.Pool, span, rows=rows, cols=cols)
        else:
            if not (isinstance(val, ScalarNode) and val.value == "all"):
                raise self.fail("'drop' takes the value 'all'", val, hint="write 'drop: all'")
            act = self.node(ast.DropAll, span)
        extra = {}
        if "renumber" in m:
            key, val = m["renumber"]
            if not (isinstance(val, ScalarNode) and val.value in ("true", "false")):
                raise self.fail("'renumber' takes true or false", val, hint="write 'renumber: true'")
            extra = dict(renumber=val.value == "true", renumber_span=_join(_span(key), _span(val)))
        return self.node(ast.Stage, _span(node), site=site, action=act, repeat=repeat, **extra)

    def node(self, cls, span: ast.Span, **fields):
        from pydantic import ValidationError

        from .parser import _validation_message

        try:
            return cls(span=span, **fields)
        except ValidationError as exc:
            raise _StatementError(Diagnostic(_validation_message(exc), span, code="semantic")) from None


_VALUE_HINTS = {
    "term": "a term is one string such as 'cls top 10%'",
    "terms": "write a list of terms or one string such as 'cls top 10% + buffers'",
    "quantity": "write a count such as 64 or a percentage such as 10%",
    "budget_body": "write a budget such as 'flops <= 25%'",
    "site": "write a site such as vit.layer16",
    "region_body": "write 'crop', 'region 2x2' or 'chunk 16'",
    "grid": "write a grid such as 2x2",
}


def yaml_root(text: str) -> Node | None:
    """The root node of the one YAML document in `text`, composed by the safe loader (no
    tag can build a Python object); raises yaml's own errors."""
    loader = yaml.SafeLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def mark_span(exc: yaml.MarkedYAMLError) -> ast.Span | None:
    """Where a YAML error points (its problem, else its context), as a one-column span."""
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return None
    return ast.Span(line=mark.line + 1, column=mark.column + 1, end_line=mark.line + 1, end_column=mark.column + 1)


def from_yaml(text: str, filename: str = "<policy>") -> ast.Policy:
    """Read the YAML form; every problem is a located `PolicyError`."""
    check_size(text, filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        root = yaml_root(text)
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        raise PolicyError(Diagnostic(f"invalid YAML: {problem}", mark_span(exc), code="yaml"), source=text,
                          filename=filename) from None
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line = before.count("\n") + 1
        col = exc.position - (before.rfind("\n") + 1) + 1
        span = ast.Span(line=line, column=col, end_line=line, end_column=col)
        raise PolicyError(Diagnostic(f"invalid YAML: character U+{exc.character if isinstance(exc.character, int) else ord(exc.character):04X} is not allowed", span, code="yaml"),
                          source=text, filename=filename) from None
    except yaml.YAMLError as exc:
        raise PolicyError(Diagnostic(f"invalid YAML: {exc}", None, code="yaml"), filename=filename) from None
    except RecursionError:
        raise PolicyError(Diagnostic("invalid YAML: the document nests too deeply", None, code="yaml"),
                          filename=filename) from None
    reader = _Reader(text, filename)
    try:
        return reader.policy(root)
    except _StatementError as err:
        raise PolicyError(reader.diagnostics + [err.diagnostic], source=text, filename=filename) from None
