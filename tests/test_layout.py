"""The package layout holds: model/ is the network only, and no import circle runs through the
model, inference or planner packages (every import counted: module-level, inside functions, and
under ``if TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of src/ it imports (a name resolves to its longest module prefix)."""
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        package = module if is_package else module.rpartition(".")[0]
        names = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names += [base] + [f"{base}.{a.name}" for a in node.names]
        graph[module] = {r for r in map(resolve, names) if r and r != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                component.add(w)
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_model_imports_only_the_network_and_its_formats():
    graph = import_graph()
    outside = {(m, d) for m, deps in graph.items() if m.startswith("videollama.model") for d in deps
               if d.split(".")[1] in ("train", "serve", "eval", "curate", "plan", "inference")}
    assert not outside, sorted(outside)


def test_no_import_circle_through_model_inference_or_plan():
    mine = ("videollama.model", "videollama.inference", "videollama.plan")
    circles = [sorted(c) for c in cycles(import_graph()) if any(m.startswith(mine) for m in c)]
    assert not circles, circles
    # The check sees a circle when there is one: a planner module importing the estimate back.
    graph = import_graph()
    graph["videollama.plan.settings"] = graph["videollama.plan.settings"] | {"videollama.plan.estimate"}
    assert any("videollama.plan.settings" in c for c in cycles(graph))
