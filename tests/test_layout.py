"""The package layout holds: model/ is the network only, and no import circle runs through the
model, inference or planner packages (every import counted: module-level, inside functions, and
under ``if TYPE_CHECKING``); no file of src/ is over 400 lines, no function over 80."""

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


def test_no_import_circle_anywhere_under_src():
    assert cycles(import_graph()) == []


def test_one_definition_of_the_shared_constants():
    """IGNORE_INDEX and the text/JSON caps are defined once (videollama/constants.py), and no bare
    -100 stands in for IGNORE_INDEX in code (docstrings may say -100)."""
    shared = {"IGNORE_INDEX", "MAX_TEXT_CHARS", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_LINE_BYTES",
              "MAX_TEXTS_PER_CLIP"}
    defined: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in shared:
                        defined.setdefault(target.id, []).append(path.name)
        bare = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.UnaryOp)
                and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
                and node.operand.value == 100]
        assert not bare or path.name == "constants.py", f"{path}: a bare -100 at lines {bare}"
    assert defined == dict.fromkeys(shared, ["constants.py"])


MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def oversized(root: Path = SRC) -> tuple[list[str], list[str]]:
    """The files of ``root`` over MAX_FILE_LINES lines and the functions (methods and nested ones
    too) over MAX_FUNCTION_LINES, signature and docstring counted, each named with its size."""
    files, functions = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(root)
        if (lines := len(text.splitlines())) > MAX_FILE_LINES:
            files.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    functions.append(f"{name}:{node.lineno} {node.name}: {size} lines")
    return files, functions


def test_no_file_over_400_lines():
    files, _ = oversized()
    assert not files, f"over {MAX_FILE_LINES} lines: {files}"


def test_no_function_over_80_lines():
    _, functions = oversized()
    assert not functions, f"over {MAX_FUNCTION_LINES} lines: {functions}"


def test_the_size_checks_see_a_long_file_and_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n" + "\n" * (MAX_FILE_LINES - MAX_FUNCTION_LINES))
    (tmp_path / "short.py").write_text("def short():\n    return 1\n")
    files, functions = oversized(tmp_path)
    assert files == [f"long.py: {MAX_FILE_LINES + 1} lines"]
    assert functions == [f"long.py:1 long: {MAX_FUNCTION_LINES + 1} lines"]
