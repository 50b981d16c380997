"""The package's imports run one way (DESIGN section 1, STYLE "imports run like floors of a house"): no
module of `snapkv_jax/` reaches itself through its imports.

The graph is read from the source with `ast`, so it sees every import a module can ever run: at module
level, inside functions (deferred imports that only hide a cycle), under `if TYPE_CHECKING:` (a cycle a
type checker or a refactor will trip on), absolute and relative. An edge A -> B means running A can
import B: `import P.m` / `from P.m import x` import P.m and run the `__init__` of each package enclosing
P.m that does not enclose A (those A's own import is already inside); `from P import x` imports P.x when
it is a module, else reads a name from P's `__init__`, an edge to P even from inside P.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "snapkv_jax"


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every `.py` under the package directory `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _is_package(name: str, modules: dict[str, pathlib.Path]) -> bool:
    return modules[name].name == "__init__.py"


def _enclosing(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(importer: str, module: str, names: list[str] | None, modules) -> set[str]:
    """Modules of the package that `import module` (names None) or `from module import names` in
    `importer` runs, per the rule in the module docstring."""
    if module not in modules:
        return set()
    inside = set(_enclosing(importer)) | ({importer} if _is_package(importer, modules) else set())
    hit: set[str] = set()

    def add(m, with_itself=True):
        hit.update([m] if with_itself else [])
        hit.update(p for p in _enclosing(m) if p not in inside)

    if names is None or not _is_package(module, modules):
        add(module)
    else:
        for n in names:
            if f"{module}.{n}" in modules:
                add(f"{module}.{n}")
            else:  # a name read from the package's __init__
                hit.add(module)
                add(module, with_itself=False)
    hit.discard(importer)
    return hit


def import_graph(root: pathlib.Path) -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first import statement that imports it}."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        package = name if _is_package(name, modules) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = set().union(*(_targets(name, a.name, None, modules) for a in node.names))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                found = _targets(name, base, [a.name for a in node.names], modules)
            else:
                continue
            for target in found:
                edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle [m0, m1, ..., m0] of the graph if there is any, else None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def describe(cycle: list[str], graph) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20, "the walk must see the whole package"
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe(cycle, graph)}"


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files", [
    {"pkg/__init__.py": "", "pkg/a.py": "def f():\n    from pkg import b\n", "pkg/b.py": "import pkg.a\n"},
    {"pkg/__init__.py": "", "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from pkg.b import X\n", "pkg/b.py": "from .a import f\n"},
    # importing pkg.sub.c runs pkg/sub/__init__.py, which imports pkg.a
    {"pkg/__init__.py": "", "pkg/a.py": "from pkg.sub.c import g\n", "pkg/sub/__init__.py": "from ..a import f\n",
     "pkg/sub/c.py": ""},
    # a lower module reading a name from the top package's __init__, which imports it
    {"pkg/__init__.py": "from pkg.a import f\n", "pkg/a.py": "from pkg import VERSION\n"},
], ids=["function-level", "type-checking-relative", "subpackage-init", "top-level-name"])
def test_cycles_of_every_import_kind_are_found(tmp_path, files):
    assert find_cycle(import_graph(_write(tmp_path, files))) is not None


def test_sibling_imports_inside_a_package_are_no_cycle(tmp_path):
    files = {"pkg/__init__.py": "from pkg.sub import c\n", "pkg/a.py": "", "pkg/sub/__init__.py": "from pkg.sub.c import g\n",
             "pkg/sub/c.py": "from pkg.sub import d\nfrom pkg import a\n", "pkg/sub/d.py": "from . import e\n",
             "pkg/sub/e.py": ""}
    graph = import_graph(_write(tmp_path, files))
    assert find_cycle(graph) is None and "pkg.sub.e" in graph["pkg.sub.d"]
