"""The package's import graph has no cycles: every import statement counts, at module level or inside a function,
``TYPE_CHECKING`` blocks included (a lazy import that runs both ways is still two modules that need each other).
Shared constants and helpers live a floor below the modules that use them."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the import name it has (kernels/vladva_kernels installs as vladva_openclip.kernels)
ROOTS = {REPO / "vladva_openclip": "vladva_openclip", REPO / "kernels" / "vladva_kernels": "vladva_openclip.kernels"}


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Import name -> (file, is a package's __init__)."""
    mods = {}
    for folder, name in ROOTS.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join([name, *parts])] = (f, is_pkg)
    return mods


def imported_names(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    return [target, *(f"{target}.{a.name}" for a in node.names)]  # `from pkg import submodule` names a module


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, (file, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported_names(module, is_pkg, node):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                # importing one's own parent package is how Python imports any submodule: not an edge
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "vladva_openclip.kernels" in graph["vladva_openclip.model"]  # from .kernels import ...
    assert "vladva_openclip.analysis.cli" in graph["vladva_openclip.cli"]  # an import inside a function
    assert "vladva_openclip.kernels._pool_index" in graph["vladva_openclip.kernels.pooling_triton"]


def test_no_import_cycles_among_the_package_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (move what both sides share down a floor): " + "; ".join(
        " <-> ".join(c) for c in found)
