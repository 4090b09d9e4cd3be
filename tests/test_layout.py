"""The code's shape: no import cycles in the core, and each cost rule written once."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"partc": ROOT / "partc", "partc.passes": ROOT / "passes", "partc.targets": ROOT / "targets"}

# Every rule partc prices plans by, and the names it keys them with: defined once each.
RULES = (
    "tiled_step_seconds", "schedule_seconds", "program_seconds", "transfer_seconds", "stream_seconds",
    "effective_bandwidth", "predict", "evaluate", "priced", "cost_graph", "link_price", "link_name",
    "OBJECTIVES", "CALL_SECONDS", "NO_CODEC",
)


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _imports(tree: ast.Module, modules: dict[str, Path]) -> set[str]:
    """The partc modules a module imports, at module level or inside functions, not under TYPE_CHECKING."""
    found = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules}


def test_no_import_cycles_lazy_imports_included():
    modules = _modules()
    graph = {name: _imports(ast.parse(path.read_text()), modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def walk(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                cycles.append(" -> ".join([*path[path.index(other):], other]))
            elif other not in state:
                walk(other, [*path, other])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []


def test_every_cost_rule_is_defined_once():
    defined = Counter()
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined[node.name] += 1
            elif isinstance(node, ast.Assign):
                defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    assert {rule: defined[rule] for rule in RULES} == dict.fromkeys(RULES, 1)
