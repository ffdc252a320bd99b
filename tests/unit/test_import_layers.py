"""The runtime's modules import one way only: ops -> graph -> space -> mutation -> optimizers ->
evaluation -> experiment -> distributed -> results/cli, and no two modules import each other,
directly or round a loop.

Every `import` / `from ... import` in runtime/morphml counts, wherever it stands: at module level,
inside a function (a lazy import is still a dependency, and a function-local import is the usual
way to hide a circle), or under `if TYPE_CHECKING:`. `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg`; the parent packages Python runs on the way are
not counted (they are not a dependency the code states).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "runtime" / "morphml"

# In order: a module may import modules of its own layer or an earlier one, never a later one.
# The package root sits with the space because it re-exports `SearchSpace` and `Layer`.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ops", ("morphml.ops",)),
    ("pareto", ("morphml.pareto",)),
    ("graph", ("morphml.graph",)),
    ("space", ("morphml.space", "morphml")),
    ("mutation", ("morphml.mutation",)),
    ("optimizers", ("morphml.optimizers",)),
    ("evaluation", ("morphml.evaluation",)),
    ("experiment", ("morphml.experiment",)),
    ("distributed", ("morphml.distributed", "morphml.dashboard")),  # the master serves the dashboard
    ("cli", ("morphml.results", "morphml.results_fetch", "morphml.cli")),
]


def module_files(root: Path | None = None) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (packages by their __init__)."""
    root = root or PACKAGE_DIR
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names this module or a package above it."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise KeyError(module)
    return best[0]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported morphml module, line) for every import statement anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "morphml"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "morphml":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in modules else base, node.lineno))
    return list(dict.fromkeys(found))  # one entry per (target, line), in file order


def import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(edges):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(edges.get(start, ())))]
        path = [start]
        state[start] = 1
        while stack:
            node, pending = stack[-1]
            if not pending:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = pending.pop(0)
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(edges.get(nxt, ()))))
    return None


def test_every_runtime_module_has_a_layer():
    unplaced = []
    for name in module_files():
        try:
            layer_of(name)
        except KeyError:
            unplaced.append(name)
    assert not unplaced, f"modules with no layer in LAYERS (place them): {unplaced}"


def test_no_module_imports_a_later_layer():
    upward = []
    for module, imports in import_graph().items():
        for target, line in imports:
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"{module}:{line} imports {target} ({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "imports against the layer order:\n  " + "\n  ".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    edges = {module: {target for target, _ in imports if target != module} for module, imports in graph.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_space_and_graph_share_the_vocabulary_module_and_graph_knows_no_space():
    graph = import_graph()
    assert "morphml.ops" in {t for t, _ in graph["morphml.graph"]}
    assert "morphml.ops" in {t for t, _ in graph["morphml.space"]}
    graph_deps = {t for t, _ in graph["morphml.graph"]}
    assert graph_deps <= {"morphml.ops"}, f"morphml.graph may import only morphml.ops, imports {sorted(graph_deps)}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    # The checker itself: a function-local import hiding a circle, and a relative import, are edges.
    pkg = tmp_path / "morphml"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from morphml.b import g\n    return g\n")
    (pkg / "b.py").write_text("from morphml.a import f\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from ..a import f\n")
    modules = module_files(pkg)
    edges = {name: {t for t, _ in imports_of(name, path, modules)} for name, path in modules.items()}
    assert edges["morphml.a"] == {"morphml.b"}
    assert edges["morphml.sub"] == {"morphml.sub.c"}
    assert edges["morphml.sub.c"] == {"morphml.a"}
    assert find_cycle(edges) in (["morphml.a", "morphml.b", "morphml.a"], ["morphml.b", "morphml.a", "morphml.b"])
