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

The keys are those of `yaml_keys` (one table); `YamlReader` walks a document and checks its
shape (keys, placement, one action) once for policies and spaces: `_PolicyReader` turns
the values into AST nodes, the space reader (`search.space`) into `.vt` text with holes.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import ast
from .errors import Diagnostic, PolicyError, did_you_mean
from .format import format_budget_body, format_decode_count, format_merge_body, format_term
from .parser import _StatementError, _Where, check_size, has_surrogate, parse_value
from .yaml_keys import (ACTIONS, DECODE, DECODE_KEYS, RENUMBER, TOP_KEYS, KeepOption, key_rule, keep_keys, keep_options,
                        quantity_data, rest_listing, stage_keys)

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


def _action_data(a: ast.Action) -> dict:
    if isinstance(a, ast.Keep):
        item: dict = {"keep": [format_term(t) for t in a.terms]}
        for option in keep_options():
            option.write(a, item)
        return item
    if isinstance(a, ast.Merge):
        return {"merge": format_merge_body(a) if a.static else quantity_data(a.pairs)}
    if isinstance(a, ast.Pool):
        return {"pool": f"{a.rows}x{a.cols}"}
    return {"drop": "all"}


def _stage_data(stage: ast.Stage) -> dict:
    if stage.repeat is not None:
        item: dict = {"every": stage.repeat.step, "from": stage.site.text(), "to": stage.repeat.end.text()}
    else:
        item = {"at": stage.site.text()}
    item.update(_action_data(stage.action))
    if stage.renumber:
        item[RENUMBER] = True
    return item


def policy_to_data(policy: ast.Policy) -> dict:
    data: dict = {}
    if policy.name is not None:
        data["policy"] = policy.name
    if policy.model is not None:
        data["model"] = policy.model
    if policy.budgets:
        data["budget"] = [format_budget_body(b) for b in policy.budgets]
    data["stages"] = [_stage_data(stage) for stage in policy.stages]
    if policy.decode:
        data[DECODE] = [{"at": d.site.text(), "attend": quantity_data(d.qty) if d.qty else format_decode_count(d)}
                        for d in policy.decode]
    return data


def to_yaml(policy: ast.Policy) -> str:
    """The canonical YAML text of a policy (no comments)."""
    return yaml.dump(
        policy_to_data(policy), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
        allow_unicode=True, width=1 << 30,
    )


# ---------------------------------------------------------------------------------------
# Reading a YAML document (policies and spaces)


def _span(node: Node) -> ast.Span:
    s, e = node.start_mark, node.end_mark
    end_col = e.column if e.line > s.line or e.column > s.column else s.column + 1
    return ast.Span(line=s.line + 1, column=s.column + 1, end_line=e.line + 1, end_column=max(end_col, 1))


def _join(a: ast.Span, b: ast.Span) -> ast.Span:
    return ast.Span(line=a.line, column=a.column, end_line=b.end_line, end_column=b.end_column)


def _either(words) -> str:
    """'a' or 'b' (quoted)."""
    return " or ".join(f"'{w}'" for w in words)


Keys = Mapping[str, tuple[ScalarNode, Node]]  # a mapping's keys: name -> (key node, value node)


class YamlReader:
    """One walk over a composed document, with its shape checked once for policies and
    spaces: top keys, anchors, duplicate and unknown keys, a stage's placement and its one
    action. A subclass says how a node is located (`span`) and what the pieces become
    (`header`, `budget`, `stage`, `finish`, `empty`). Errors are `error_type`, collected
    per statement; `read` raises one `PolicyError` with them all."""

    document = "a YAML policy"  # how messages name the top mapping
    noun = "policies"  # "YAML anchors ... are not supported in <noun>"
    variants: dict[str, tuple[str, ...]] = {}  # other spellings of placement keys (a space's at?)
    site_note = ""  # what "a stage needs 'at: <site>'" adds about those spellings
    error_type: type[Exception] = _StatementError
    max_diagnostics: int | None = None
    top_keys: tuple[str, ...] = TOP_KEYS

    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename
        self.seen: set[int] = set()
        self.diagnostics: list[Diagnostic] = []

    # -- locations and errors -----------------------------------------------------------
    def span(self, node: Node) -> ast.Span:
        raise NotImplementedError

    def show(self, name: str) -> str:
        """A key as error messages quote it."""
        return name[:40]

    def fail(self, message: str, node: Node | None, *, expected: str | None = None,
             hint: str | None = None) -> Exception:
        span = self.span(node) if node is not None else None
        return self.error_type(Diagnostic(message, span, expected=expected, hint=hint, code="yaml"))

    def guard(self, fn):
        try:
            return fn()
        except self.error_type as err:
            self.diagnostics.append(err.diagnostic)
            return None

    # -- nodes --------------------------------------------------------------------------
    def visit(self, node: Node) -> Node:
        if id(node) in self.seen:
            raise self.fail(f"YAML anchors and aliases are not supported in {self.noun}", node,
                            hint="write the value out again")
        self.seen.add(id(node))
        return node

    def items(self, node: SequenceNode) -> list[Node]:
        return [self.visit(n) for n in node.value]

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
                raise self.fail(f"unknown key '{self.show(name)}' in {what}", key, expected=", ".join(keys),
                                hint=did_you_mean(name[:64], keys))
            if name in out:
                raise self.fail(f"duplicate key '{name}' in {what} (first on line "
                                f"{out[name][0].start_mark.line + 1})", key)
            out[name] = (key, value)
        return out

    def scalar(self, node: Node, what: str, hint: str | None = None) -> ScalarNode:
        if not isinstance(node, ScalarNode) or self.is_null(node):
            raise self.fail(f"{what} must be a single value", node, hint=hint)
        return node

    def header_text(self, node: Node, key: str) -> str:
        if not isinstance(node, ScalarNode) or self.is_null(node):
            raise self.fail(f"'{key}' must be a string", node, hint='quote it: "..."')
        return node.value

    @staticmethod
    def is_word(node: Node, *words: str) -> bool:
        return isinstance(node, ScalarNode) and node.value in words

    @staticmethod
    def is_null(node: Node) -> bool:
        """An empty value (`key:`) or a null."""
        return isinstance(node, ScalarNode) and node.tag == _NULL

    # -- the document -------------------------------------------------------------------
    def read(self, root: Node | None):
        if root is None:
            return self.empty()
        try:
            self.visit(root)
            top = self.mapping(root, self.document, self.top_keys)
            headers = {key: self.guard(lambda k=key: self.header(k, top[k][1]))
                       for key in ("policy", "model") if key in top}
            budgets = [self.guard(lambda n=n: self.budget(n)) for n in self._budget_nodes(top)]
            stages = [self.guard(lambda n=n: self.stage(n)) for n in self._stage_nodes(top)]
            self.decode_selects = [self.guard(lambda n=n: self.decode_select(n)) for n in self._list_nodes(top, DECODE)]
        except self.error_type as err:
            self.diagnostics.append(err.diagnostic)
        if self.diagnostics:
            raise PolicyError(self.diagnostics[: self.max_diagnostics], source=self.text, filename=self.filename)
        return self.finish(root, top, headers, budgets, stages)

    def _budget_nodes(self, top: Keys) -> list[Node]:
        if "budget" not in top:
            return []
        node = top["budget"][1]
        return self.items(node) if isinstance(node, SequenceNode) else [node]

    def _stage_nodes(self, top: Keys) -> list[Node]:
        return self._list_nodes(top, "stages")

    def _list_nodes(self, top: Keys, key: str) -> list[Node]:
        if key not in top:
            return []
        node = top[key][1]
        if not isinstance(node, SequenceNode):
            self.diagnostics.append(self.fail(f"'{key}' must be a list", node).diagnostic)
            return []
        return self.items(node)

    # -- the shape of a stage -----------------------------------------------------------
    def stage_mapping(self, node: Node) -> dict[str, tuple[ScalarNode, Node]]:
        return self.mapping(node, "a stage", stage_keys(self.variants))

    def placement(self, m: Keys, node: Node) -> bool:
        """Checks the `at` / schedule keys; whether the stage is a schedule."""
        at_keys = [k for k in self.variants.get("at", ("at",)) if k in m]
        every = [k for k in self.variants.get("every", ("every",)) if k in m]
        schedule = bool(every) or "from" in m or "to" in m
        if schedule and at_keys:
            raise self.fail(f"a stage has '{at_keys[0]}' or a schedule ('every', 'from', 'to'), not both",
                            m[at_keys[0]][0])
        if len(every) > 1:
            raise self.fail(f"a schedule has {_either(every)}, not both", m[every[1]][0])
        if schedule:
            for k in ("from", "to"):
                if k not in m:
                    raise self.fail(f"a schedule needs '{k}: <site>'", node, expected="from: vit.layer2, to: vit.layer22")
        elif not at_keys:
            raise self.fail(f"a stage needs 'at: <site>'{self.site_note}", node, expected="a site such as vit.layer16")
        if len(at_keys) > 1:
            raise self.fail(f"a stage has {_either(at_keys)}, not both", m[at_keys[1]][0])
        return schedule

    def action(self, m: Keys, node: Node) -> str:
        """The stage's one action; keep options only beside 'keep'."""
        actions = [k for k in ACTIONS if k in m]
        if not actions:
            raise self.fail("a stage needs an action", node,
                            expected=f"one of {', '.join(ACTIONS[:-1])} or {ACTIONS[-1]}")
        if len(actions) > 1:
            raise self.fail(f"a stage has one action, got {' and '.join(actions)}", m[actions[1]][0],
                            hint="write a second stage at the same site")
        action = actions[0]
        for extra in keep_keys():
            if extra in m and action != "keep":
                raise self.fail(f"'{extra}' belongs to 'keep', not to '{action}'", m[extra][0])
        return action

    def keep_items(self, node: SequenceNode) -> list[Node]:
        nodes = self.items(node)
        if not nodes:
            raise self.fail("'keep' needs at least one term", node,
                            expected="a term such as 'cls top 10%', 'diverse 64' or 'buffers'")
        return nodes

    def together(self, m: Keys, option: KeepOption) -> None:
        """An option whose keys go together has all of them or none."""
        if option.together is None:
            return
        names = [k.name for k in option.keys]
        have = [n for n in names if n in m]
        if have and len(have) < len(names):
            missing = next(n for n in names if n not in m)
            raise self.fail(f"'{have[0]}' needs '{missing}' beside it", m[have[0]][0], expected=option.together)


# ---------------------------------------------------------------------------------------
# YAML -> AST


_VALUE_HINTS = {
    "term": "a term is one string such as 'cls top 10%'",
    "terms": "write a list of terms or one string such as 'cls top 10% + buffers'",
    "quantity": "write a count such as 64 or a percentage such as 10%",
    "budget_body": "write a budget such as 'flops <= 25%'",
    "site": "write a site such as vit.layer16",
    "region_body": "write 'crop', 'frame', 'region 2x2', 'chunk 16', 'window 4' or 'segment 8'",
    "grid": "write a grid such as 2x2",
    "decode_count": "write a count such as 64, a percentage such as 10% or a share such as p 0.9",
}


class _PolicyReader(YamlReader):
    """Each value is parsed by its grammar rule, located in the YAML file."""

    top_keys = TOP_KEYS + (DECODE,)

    def span(self, node: Node) -> ast.Span:
        return _span(node)

    def join(self, a: Node, b: Node) -> ast.Span:
        return _join(_span(a), _span(b))

    def value(self, node: Node, start: str, what: str):
        self.scalar(node, what, hint=_VALUE_HINTS.get(start))
        s = node.start_mark
        column = s.column + 1 + (1 if node.style in ("'", '"') else 0)
        if node.style in ("|", ">"):
            column = s.column + 1
        where = _Where(self.filename, self.text, line=s.line + 1, column=column, end_words="the end of the value")
        return parse_value(node.value, start, where)

    def key_value(self, m: Keys, name: str):
        """The value of key `name`, read by its rule in the key table."""
        return self.value(m[name][1], key_rule(name), f"'{name}'")

    def node(self, cls, span: ast.Span, **fields):
        from pydantic import ValidationError

        from .parser import _validation_message

        try:
            return cls(span=span, **fields)
        except ValidationError as exc:
            raise _StatementError(Diagnostic(_validation_message(exc), span, code="semantic")) from None

    def one_rest(self, m: Keys, option: KeepOption) -> None:
        """A keep handles its rest one way: `option` after an earlier rest option is an error."""
        rest = [o for o in keep_options() if o.rest]
        if any(o.present(m) for o in rest[: rest.index(option)]):
            message, expected = option.clash or (f"a keep takes one of {rest_listing(option)}", "one of them")
            raise self.fail(message, m[option.first][0], expected=expected)

    # -- the pieces ---------------------------------------------------------------------
    def header(self, key: str, node: Node) -> str:
        text = self.header_text(node, key)
        if has_surrogate(text):
            raise self.fail(f"'{key}' holds a lone surrogate escape, which is not a character", node)
        return text

    def decode_select(self, node: Node) -> ast.DecodeSelect:
        m = self.mapping(node, "a decode stage", tuple(DECODE_KEYS))
        for key in DECODE_KEYS:
            if key not in m:
                raise self.fail(f"a decode stage needs '{key}'", node,
                                expected="at: llm.layerN and attend: K (a count, a percentage or p 0.9)")
        site, count = (self.value(m[k][1], rule, f"'{k}'") for k, rule in DECODE_KEYS.items())
        return self.node(ast.DecodeSelect, _span(node), site=site, **count)

    def budget(self, node: Node) -> ast.Budget:
        b = self.value(node, "budget_body", "a budget")
        return b.model_copy(update={"span": _span(node)})

    def stage(self, node: Node) -> ast.Stage:
        m = self.stage_mapping(node)
        repeat = site = None
        if self.placement(m, node):
            repeat, site = self.schedule(m)
        action = self.action(m, node)
        if repeat is None:
            site = self.key_value(m, "at")
        act = getattr(self, f"read_{action}")(m)
        return self.node(ast.Stage, _span(node), site=site, action=act, repeat=repeat, **self.renumber(m))

    def schedule(self, m: Keys) -> tuple[ast.Repeat, ast.Site]:
        step = 1
        if "every" in m:
            val = m["every"][1]
            if not (isinstance(val, ScalarNode) and re.fullmatch(r"[0-9]{1,6}", val.value)
                    and 1 <= int(val.value) <= ast.MAX_LAYER):
                raise self.fail("'every' takes a whole number of layers, 1 or more", val, hint="write 'every: 2'")
            step = int(val.value)
        end = self.key_value(m, "to")
        repeat = self.node(ast.Repeat, self.join(m["from"][0], m["to"][1]), step=step, end=end)
        return repeat, self.key_value(m, "from")

    def read_keep(self, m: Keys) -> ast.Keep:
        key, val = m["keep"]
        if isinstance(val, SequenceNode):
            terms = [self.value(n, "term", "a term") for n in self.keep_items(val)]
        else:
            terms = self.key_value(m, "keep")
        fields: dict = {}
        for option in keep_options():
            option.read(self, m, fields)
        last = max((m[k][1] for k in ("keep",) + keep_keys() if k in m),
                   key=lambda n: (n.end_mark.line, n.end_mark.column))
        return self.node(ast.Keep, self.join(key, last), terms=terms, **fields)

    def read_merge(self, m: Keys) -> ast.Merge:
        return self.node(ast.Merge, self.join(*m["merge"]), **self.key_value(m, "merge"))

    def read_pool(self, m: Keys) -> ast.Pool:
        rows, cols = self.key_value(m, "pool")
        return self.node(ast.Pool, self.join(*m["pool"]), rows=rows, cols=cols)

    def read_drop(self, m: Keys) -> ast.DropAll:
        if not self.is_word(m["drop"][1], "all"):
            raise self.fail("'drop' takes the value 'all'", m["drop"][1], hint="write 'drop: all'")
        return self.node(ast.DropAll, self.join(*m["drop"]))

    def renumber(self, m: Keys) -> dict:
        if RENUMBER not in m:
            return {}
        key, val = m[RENUMBER]
        if not self.is_word(val, "true", "false"):
            raise self.fail("'renumber' takes true or false", val, hint="write 'renumber: true'")
        return dict(renumber=val.value == "true", renumber_span=self.join(key, val))

    # -- the document -------------------------------------------------------------------
    def empty(self) -> ast.Policy:
        return ast.Policy(span=ast.Span(line=1, column=1, end_line=1, end_column=1))

    def finish(self, root: Node, top: Keys, headers: dict, budgets: list, stages: list) -> ast.Policy:
        fields: dict = {}
        if "policy" in headers:
            fields["name"] = headers["policy"]
        if "model" in headers:
            fields["model"] = headers["model"]
            fields["model_span"] = _span(top["model"][0])
        decode = [d for d in getattr(self, "decode_selects", []) if d is not None]
        return ast.Policy(**fields, budgets=budgets, stages=stages, decode=decode, span=_span(root))


# ---------------------------------------------------------------------------------------
# The document


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


def _character_error(text: str, exc: yaml.reader.ReaderError) -> Diagnostic:
    before = text[: exc.position]
    line = before.count("\n") + 1
    col = exc.position - (before.rfind("\n") + 1) + 1
    span = ast.Span(line=line, column=col, end_line=line, end_column=col)
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    return Diagnostic(f"invalid YAML: character U+{code:04X} is not allowed", span, code="yaml")


def compose_yaml(text: str, filename: str,
                 hint: Callable[[yaml.MarkedYAMLError], str | None] | None = None) -> Node | None:
    """The root node of `text`; a located `PolicyError` for invalid YAML (`hint` may add a
    hint to a syntax error)."""
    try:
        return yaml_root(text)
    except yaml.MarkedYAMLError as exc:
        problem = exc.problem or exc.context or "invalid YAML"
        diagnostic = Diagnostic(f"invalid YAML: {problem}", mark_span(exc), hint=hint(exc) if hint else None,
                                code="yaml")
    except yaml.reader.ReaderError as exc:
        diagnostic = _character_error(text, exc)
    except yaml.YAMLError as exc:
        raise PolicyError(Diagnostic(f"invalid YAML: {exc}", None, code="yaml"), filename=filename) from None
    except RecursionError:
        raise PolicyError(Diagnostic("invalid YAML: the document nests too deeply", None, code="yaml"),
                          filename=filename) from None
    raise PolicyError(diagnostic, source=text, filename=filename)


def from_yaml(text: str, filename: str = "<policy>") -> ast.Policy:
    """Read the YAML form; every problem is a located `PolicyError`."""
    check_size(text, filename)
    if text.startswith("\ufeff"):
        text = text[1:]
    return _PolicyReader(text, filename).read(compose_yaml(text, filename))
