"""The package's shape (issue 18), read from the source with `ast`, nothing imported:

- the module import graph of vtdsl has no cycle, neither among the imports that run at
  import time nor once function-local imports are added;
- the pipeline order of docs/dev/contracts.md holds: lang imports no ir / cost / compiler
  (of ops only the torch-free catalogues vtdsl.ops.scorers and vtdsl.ops.rest), ir no cost
  / compiler, cost no compiler, ops no compiler / cli, models (the spec rules of the
  families included) no compiler / cli;
- those two catalogues import no torch at module level, neither themselves nor through
  the vtdsl modules they import at module level;
- no function in vtdsl/ is over 80 lines unless its docstring says why (it mentions
  "80 lines", e.g. "Over 80 lines because ...").

Function-local imports count for the stage order and the second cycle check (a lazy
import is still a dependency); imports under `if TYPE_CHECKING:` never count (they never
run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vtdsl"
MAX_LINES = 80
TORCH_FREE = ("vtdsl.ops.scorers", "vtdsl.ops.rest")
# (importer stage, stages it must not import)
FORBIDDEN = {
    "vtdsl.lang": ("vtdsl.ir", "vtdsl.cost", "vtdsl.compiler", "vtdsl.ops"),
    "vtdsl.ir": ("vtdsl.cost", "vtdsl.compiler"),
    "vtdsl.cost": ("vtdsl.compiler",),
    "vtdsl.ops": ("vtdsl.compiler", "vtdsl.cli"),
    "vtdsl.models": ("vtdsl.compiler", "vtdsl.cli"),
}
ALLOWED = {"vtdsl.lang": TORCH_FREE}  # exceptions to FORBIDDEN


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, module_level_only: bool):
    """Import statements that run: skips `if TYPE_CHECKING:` bodies, and function bodies
    when `module_level_only`."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(name: str, path: Path, known: set[str], module_level_only: bool = False) -> set[str]:
    """Every module `name` imports, vtdsl ones resolved to the exact module (`from .x import y`
    is the module x.y when y is a module, else x); others by their top-level name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _import_nodes(tree, module_level_only):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _absolute(node, name, is_package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            found.add(target if target.split(".")[0] == "vtdsl" else target.split(".")[0])
    return found


def import_graph(module_level_only: bool = False) -> nx.DiGraph:
    mods = modules()
    known = set(mods)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in mods.items():
        for target in imported_names(name, path, known, module_level_only):
            graph.add_edge(name, target)
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_graph_reader_resolves_relative_and_nested_imports(tmp_path):
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nimport torch\n"
              "from ..ir import plan\nfrom ..ir.plan import Plan\nfrom . import ast\n"
              "if TYPE_CHECKING:\n    from ..compiler import api\n"
              "def f():\n    from ..cost import estimate\n    import numpy\n")
    path = tmp_path / "mod.py"
    path.write_text(source)
    known = {"vtdsl.ir", "vtdsl.ir.plan", "vtdsl.lang", "vtdsl.lang.ast", "vtdsl.cost"}
    every = imported_names("vtdsl.lang.mod", path, known)
    assert every == {"__future__", "typing", "torch", "vtdsl.ir.plan", "vtdsl.lang.ast", "vtdsl.cost", "numpy"}
    top = imported_names("vtdsl.lang.mod", path, known, module_level_only=True)
    assert top == {"__future__", "typing", "torch", "vtdsl.ir.plan", "vtdsl.lang.ast"}


def _cycles(graph: nx.DiGraph) -> list[str]:
    inside = graph.subgraph([n for n in graph if _within(n, "vtdsl")])
    return sorted(" -> ".join(c + [c[0]]) for c in nx.simple_cycles(inside) if len(c) > 1)


def test_no_import_cycle_at_module_level():
    cycles = _cycles(import_graph(module_level_only=True))
    assert not cycles, f"{len(cycles)} import cycle(s) run at import time:\n" + "\n".join(cycles[:15])


# Function-local imports that are a data type's convenience over the service that implements
# it, allowed by name: `ModelSpec.build()` / `.param_count()` call `vtdsl.models.loading`,
# which takes specs as arguments. Everything else in a cycle is a layering mistake.
CONVENIENCE_EDGES = {("vtdsl.models.spec", "vtdsl.models.loading")}


def test_no_import_cycle_through_lazy_imports():
    """A function-local import that closes a cycle only hides it: the two modules still
    need each other."""
    graph = import_graph()
    graph.remove_edges_from(CONVENIENCE_EDGES)
    cycles = _cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) (function-local imports included):\n" + "\n".join(cycles[:15])


def test_stage_order():
    graph = import_graph()
    wrong = []
    for importer, target in graph.edges:
        for stage, banned in FORBIDDEN.items():
            if not _within(importer, stage):
                continue
            if any(_within(target, b) for b in banned) and not any(_within(target, a) for a in ALLOWED.get(stage, ())):
                wrong.append(f"{importer} imports {target}")
    assert not wrong, "imports against the pipeline order (lang -> ir -> cost -> compiler; ops below):\n" + \
        "\n".join(sorted(wrong))


@pytest.mark.parametrize("catalogue", TORCH_FREE)
def test_catalogues_import_no_torch_at_module_level(catalogue):
    mods = modules()
    inside = [m for m in mods if _within(m, catalogue)]
    if not inside:
        pytest.skip(f"{catalogue} does not exist yet")
    graph = import_graph(module_level_only=True)
    reached = set(inside).union(*(nx.descendants(graph, m) for m in inside))
    offenders = sorted(m for m in reached if m in mods and graph.has_edge(m, "torch"))
    assert not offenders, f"{catalogue} must be importable without torch; torch at module level in: {offenders}"


def long_functions(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    """'path:line name (N lines)' for each function over `limit` lines whose docstring does
    not say why (mention "80 lines")."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > limit and f"{limit} lines" not in (ast.get_docstring(node) or "").lower():
                out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_the_length_rule_counts_and_honours_a_reason(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "a.py").write_text(f"def long():\n{body}\n\ndef excused():\n"
                                   f"    '''Over 80 lines because a table reads best whole.'''\n{body}\n"
                                   f"def short():\n    return 1\n")
    assert [r.split(" ", 1)[1] for r in long_functions(tmp_path)] == ["long (81 lines)"]


def test_no_function_over_80_lines():
    offenders = long_functions()
    assert not offenders, (f"{len(offenders)} function(s) over {MAX_LINES} lines (split them into named steps, or say "
                           f"why in the docstring, mentioning '{MAX_LINES} lines'):\n" + "\n".join(offenders))
