"""The package's import graph: no cycles, dependencies one way, no imports hidden inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "lightning_influence"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: Imports allowed inside functions: optional dependencies only (none at present).
OPTIONAL_IMPORTS: set[str] = set()

#: Subpackages that compute. Reporting depends on them, never the reverse.
COMPUTE = ("gradients", "trajectory", "influence", "fragility", "representations", "models", "data", "utils")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` names ``a.b`` when that is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_real_edges():
    graph = import_graph()
    assert "lightning_influence.gradients.featurizer" in graph["lightning_influence.trajectory.analysis"]
    assert "lightning_influence.trajectory.analysis" in graph["lightning_influence.reporting.influence"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles inside the package:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("sub", COMPUTE)
def test_compute_never_imports_reporting(sub):
    graph = import_graph()
    offenders = {
        m: sorted(t for t in deps if t.startswith(f"{PACKAGE}.reporting"))
        for m, deps in graph.items()
        if m == f"{PACKAGE}.{sub}" or m.startswith(f"{PACKAGE}.{sub}.")
    }
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, f"compute modules importing reporting: {offenders}"


def test_no_imports_inside_functions():
    hidden = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if not all(n.split(".")[0] in OPTIONAL_IMPORTS for n in names):
                        hidden.append(f"{name}:{node.lineno} imports {names}")
    assert not hidden, "imports inside functions (move them to the top, or list an optional dependency):\n" + "\n".join(
        hidden
    )


def test_the_store_writer_and_reader_share_only_the_format_and_the_durable_writes():
    """Training writes, analysis reads: each side depends on the layout and the durable-write helpers, not on the other."""
    graph = import_graph()
    store = f"{PACKAGE}.trajectory.store"
    assert f"{store}.reader" not in graph[f"{store}.writer"]
    assert f"{store}.writer" not in graph[f"{store}.reader"]
    for side in ("writer", "reader"):
        assert {f"{store}.layout", f"{store}.durable"} <= graph[f"{store}.{side}"]
    assert not {t for t in graph[f"{store}.layout"] | graph[f"{store}.durable"] if t.startswith(f"{store}.")}
