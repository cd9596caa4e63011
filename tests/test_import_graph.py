"""fastcomer's modules import downwards only: every module sits on a floor (`FLOORS`) and
imports only from its own floor or lower ones, and no import loop exists. The graph of imports
is read statically from the source; every import counts, those inside functions too (a loop
hidden in a function still ties the modules together), except under `if TYPE_CHECKING:`."""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import fastcomer

PACKAGE_DIR = Path(fastcomer.__file__).resolve().parent


def module_files(package_dir: Path) -> Dict[str, Path]:
    """Module name -> source file, for every module of the package (a package is its __init__)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(tree: ast.AST, module: str, is_package: bool):
    """The absolute names each import of the module refers to; `from X import y` gives X.y
    (resolved later to the submodule X.y when there is one, else to X)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            node.body = []  # typing-only imports do not run
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module
            yield from (f"{base}.{alias.name}" for alias in node.names)


def resolve(name: str, modules: Set[str]) -> Optional[str]:
    """The module an imported name lives in: the longest module prefix of the name."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(package_dir: Path) -> Dict[str, Set[str]]:
    files = module_files(package_dir)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = {resolve(name, set(files)) for name in imported_names(tree, module, path.name == "__init__.py")}
        graph[module] = {target for target in targets if target is not None and target != module}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """A cycle of the graph as a list of modules (first = last), or None."""
    state: Dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# Floors, lowest first: a module belongs to the floor of the longest prefix listed (a package
# covers its submodules) and may import from its own floor and those below. A new top-level
# module must be given a floor here.
FLOORS = [
    ("fastcomer._version", "fastcomer.vocab", "fastcomer.tensor_cache", "fastcomer.allocator", "fastcomer.backends",
     "fastcomer.extras"),
    ("fastcomer.model", "fastcomer.shapes"),
    ("fastcomer.ops", "fastcomer.checkpoint"),
    ("fastcomer.search", "fastcomer.modules", "fastcomer.kernel_report"),
    ("fastcomer.patch", "fastcomer.export", "fastcomer.flop_floor", "fastcomer.recognize"),
    ("fastcomer.benchmarking", "fastcomer.serving", "fastcomer.evaluation"),
    ("fastcomer.cli", "fastcomer.__main__", "fastcomer"),
]


def floor_of(module: str) -> int:
    """The floor of the longest listed prefix of `module` (KeyError when none)."""
    best = None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (level, prefix)
    if best is None:
        raise KeyError(f"{module} has no floor in FLOORS")
    return best[0]


def upward_imports(graph: Dict[str, Set[str]]) -> List[str]:
    return sorted(f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
                  for module, targets in graph.items() for target in targets if floor_of(target) > floor_of(module))


def test_every_module_has_a_floor():
    for module in import_graph(PACKAGE_DIR):
        floor_of(module)


def test_no_import_from_a_higher_floor():
    upward = upward_imports(import_graph(PACKAGE_DIR))
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_an_upward_import_is_found():
    graph = {"fastcomer.ops.dispatch": {"fastcomer.search.engine"}, "fastcomer.search.engine": {"fastcomer.ops"}}
    assert upward_imports(graph) == ["fastcomer.ops.dispatch (floor 2) imports fastcomer.search.engine (floor 3)"]
    assert floor_of("fastcomer") == 6 and floor_of("fastcomer.cli.bench") == 6 and floor_of("fastcomer.ops.registry") == 2


def test_no_import_loop():
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_graph_holds_relative_and_submodule_imports():
    graph = import_graph(PACKAGE_DIR)
    assert "fastcomer.search.engine" in graph["fastcomer"]  # from .search.engine import beam_search
    assert "fastcomer.cli.bench" in graph["fastcomer.cli"]  # from . import bench: the submodule
    assert "fastcomer.benchmarking" in graph["fastcomer.cli.bench"]  # from ..benchmarking import ..., inside run()


def test_a_loop_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
