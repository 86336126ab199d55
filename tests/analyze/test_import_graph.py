"""No import cycle among gradflow_agent.analyze / report / detect / export, function-level imports included.

Parsed with ast, not imported: a lazy (function-level) import is an edge like any other, since it only
postpones a cycle to run time. Imports under `if TYPE_CHECKING:` are left out: they never execute.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "gradflow_agent"
PACKAGES = ("analyze", "report", "detect", "export")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = ["gradflow_agent", *path.relative_to(ROOT).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_only(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_only(tree)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports():
    g = cycles({"a": {"b"}, "b": {"a"}, "c": set()})
    assert g == [["a", "b"]]
    graph = import_graph()
    assert "gradflow_agent.report.flow_report" in graph["gradflow_agent.analyze.offline"]
    assert "gradflow_agent.report.console" in graph["gradflow_agent.report.flow_report"]  # a function-level one


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    detail = [{m: sorted(t for t in graph[m] if t in comp) for m in comp} for comp in found]
    assert not found, detail


def test_the_former_cycles_are_gone():
    graph = import_graph()
    assert "gradflow_agent.analyze.offline" not in graph["gradflow_agent.report.flow_report"]
    assert "gradflow_agent.analyze.flow" not in graph["gradflow_agent.analyze.recurrent"]
