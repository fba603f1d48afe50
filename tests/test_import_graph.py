"""kpt/ has no import cycles: every import between kpt modules, at module level or inside a function,
points one way. (Imports under ``if TYPE_CHECKING:`` are for annotations only and do not count.)

A cycle is found from the source with ``ast``, so a lazy import inside a function that closes a loop is
caught too: such loops are what made ``config``, ``plugin`` and ``registry`` hard to read apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kpt

KPT_DIR = Path(kpt.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(KPT_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """kpt modules imported by the module at ``path`` (the longest known prefix of each import)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts and ".".join(parts) != name:
            found.add(".".join(parts))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                resolve(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in KPT_DIR.rglob("*.py")}
    known = set(paths)
    return {name: _imports(path, name, known) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := dfs(start)):
            return cycle
    return []


def test_the_graph_is_read_and_the_finder_sees_a_cycle():
    graph = import_graph()
    assert "kpt.config" in graph and "kpt.engine.trainer" in graph
    assert "kpt.config" in graph["kpt.engine.trainer"]  # module level
    assert "kpt.plugin" in graph["kpt.engine.weights"]  # inside a function (rebuilding a run's model)
    assert "kpt.config" not in graph["kpt.plugin.contract"]  # only under `if TYPE_CHECKING:`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_kpt():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_bottom_layers_import_nothing_above_them():
    """The names helpers, the version and the errors import no kpt module; the registry only those
    (it reaches plugin components through a hook that :mod:`kpt.plugin` installs)."""
    graph = import_graph()
    for leaf in ("kpt._names", "kpt._version", "kpt.errors"):
        assert graph[leaf] == set(), f"{leaf} imports {sorted(graph[leaf])}"
    assert graph["kpt.registry"] <= {"kpt._names", "kpt.errors"}, sorted(graph["kpt.registry"])
    assert not {"kpt.plugin", "kpt.config"} & graph["kpt.plugin.contract"]
