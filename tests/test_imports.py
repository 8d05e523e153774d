"""The modules' import graph: no circle, libraries at the bottom, and config errors answered without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

# the packages of the project and the folders they live in (models/ and datasets/ are ctkd.models, ctkd.datasets)
PACKAGES = {"ctkd": REPO_ROOT / "ctkd", "ctkd.models": REPO_ROOT / "models", "ctkd.datasets": REPO_ROOT / "datasets"}


def _modules() -> dict[str, Path]:
    """Every module of the project by its dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run: at module level, in functions and classes, but not under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement names (the module, and each imported name as a possible submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        parts = base.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    return [target, *(f"{target}.{alias.name}" for alias in node.names)]


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports (a package's implicit import by its submodules is not an edge)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(module, path, node):
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_libraries_at_the_bottom_never_import_the_config_loader_or_the_trainer() -> None:
    """models/, datasets/ and the components import the options machinery (ctkd.options), never the config loader
    that composes them nor the training stack above them."""
    graph = import_graph()
    above = {"ctkd.config", "ctkd.schema", "ctkd.trainer", "ctkd.build", "ctkd.networks"}
    for module, edges in graph.items():
        if module.startswith(("ctkd.models", "ctkd.datasets", "ctkd.methods", "ctkd.temperatures", "ctkd.curricula")):
            assert not edges & above, (module, edges & above)
    for leaf in ("ctkd.options", "ctkd.errors", "ctkd.yamlio", "ctkd.keys", "ctkd.registry", "ctkd.preemption"):
        assert graph[leaf] <= {"ctkd.errors", "ctkd.yamlio"}, (leaf, graph[leaf])


def test_a_config_error_outside_the_components_needs_no_torch() -> None:
    """Reading a config and reporting an error in its own sections imports neither torch nor any component."""
    code = ("import sys\nfrom ctkd.config import load_config\nfrom ctkd.errors import ConfigError\n"
            "try:\n    load_config('configs/quickstart.yaml', ['optimizer.lrr=1'])\nexcept ConfigError as e:\n"
            "    print('refused')\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('ctkd.methods')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["refused", "[]"], done.stdout + done.stderr
