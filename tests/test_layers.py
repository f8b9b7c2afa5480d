"""The package's import graph stays a hierarchy: no module imports, at run time, one that imports
it back (directly or through others). Imports under ``if TYPE_CHECKING:`` are type hints, not
dependencies, and are left out; imports inside functions count, since they run."""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pgpilot

PACKAGE = Path(pgpilot.__file__).parent
# Cycles allowed, with why. The N+1 detector's core loads its SQLAlchemy feed only when watching
# starts (SQLAlchemy is optional), and the feed reports to the core: a plug-in, not layering.
ALLOWED = [["pgpilot.nplusone.core", "pgpilot.nplusone.sqlalchemy_feed"]]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def runtime_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports when it runs (not its type hints')."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a module's own packages are imported before it by Python itself: not an edge
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> Iterator[list[str]]:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                yield from visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                yield sorted(component)

    for node in sorted(graph):
        if node not in index:
            yield from visit(node)


@functools.cache
def runtime_graph() -> dict[str, set[str]]:
    """Each of the package's modules and those it imports at run time."""
    known = modules()
    return {name: runtime_imports(name, path, known) for name, path in known.items()}


def test_no_module_imports_itself_back_at_run_time() -> None:
    graph = runtime_graph()
    assert "pgpilot.proxy.stats" in graph["pgpilot.proxy.fastpath"]  # the graph is read
    found = [
        {name: sorted(graph[name] & set(component)) for name in component}
        for component in cycles(graph) if component not in ALLOWED
    ]
    assert found == []


def test_the_console_and_the_fast_path_do_not_reach_into_each_other() -> None:
    """The admin console and the fast path read the pooler's state through the pooler and its
    pools, never by importing each other or the client connection's module."""
    graph = runtime_graph()
    proxy = "pgpilot.proxy."
    assert not graph[proxy + "admin"] & {proxy + "client", proxy + "fastpath"}
    assert not graph[proxy + "fastpath"] & {proxy + "admin", proxy + "client", proxy + "pooler"}


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert list(cycles(graph)) == [["a", "b", "c"]]
