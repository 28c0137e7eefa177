"""No module of services/, gateway/, kernels/ or tandem/ imports in a circle.

The graph is built from the source with `ast`, counting every import: at module level, inside
functions (a "lazy" import only hides a circle) and under `if TYPE_CHECKING:`. Edges follow
import-linter's reading: `from pkg import mod` imports the submodule `pkg.mod` when there is one,
else `pkg` itself; `import a.b` imports `a.b`. Generated code (tandem/v1) is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "gateway", "kernels", "tandem")
GENERATED = ("tandem", "v1")


def module_files(root: Path) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if tuple(parts[:2]) == GENERATED:
                continue
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join(parts)] = (path, is_package)
    return modules


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = parts[: len(parts) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    target = submodule if submodule in modules else module
                    if target in modules:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module (breadth-first back to it)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_no_import_cycles() -> None:
    graph = import_graph(REPO)
    assert len(graph) > 100, "the walk found too few modules"
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """A circle closed only by an import inside a function, or under TYPE_CHECKING, is found."""
    (tmp_path / "services").mkdir()
    (tmp_path / "services" / "__init__.py").write_text("")
    (tmp_path / "services" / "a.py").write_text("from services.b import B\n")
    (tmp_path / "services" / "b.py").write_text("def f():\n    from services import a\n")
    (tmp_path / "services" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n"
    )
    (tmp_path / "services" / "d.py").write_text("import services.c\n")
    found = cycles(import_graph(tmp_path))
    assert sorted(found) == [
        ["services.a", "services.b", "services.a"],
        ["services.c", "services.d", "services.c"],
    ]


def test_the_services_walls_hold() -> None:
    """The gateway reaches the styler and the workers only over gRPC (it imports services/common
    and nothing else of services/, and never torch); the styler imports no worker code."""
    graph = import_graph(REPO)
    crossings = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if (module.startswith("gateway") and target.startswith(("services.styler", "services.worker")))
        or (module.startswith("services.styler") and target.startswith("services.worker"))
    ]
    assert not crossings, "imports across the service walls:\n" + "\n".join(crossings)
    for path in (REPO / "gateway").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "torch" or n.startswith("torch.") for n in names), path
