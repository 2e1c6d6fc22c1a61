"""The house rules of the source tree, read statically from the files (nothing imported): no import circles
between modules, the serving and harvest wings free of torch, harvest free of the gRPC server, and no module
over 500 lines outside bench/ and the generated stubs."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _packages() -> dict[str, Path]:
    """Each package of the distribution and its folder (pyproject's package-dir)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: ROOT / folder for name, folder in config["package-dir"].items()}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in _packages().items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """The project modules ``name`` imports (relative imports resolved; ``from P import m`` counts as P.m when
    that is a module); with ``top_level_only``, only imports that run when the module is imported."""
    tree = ast.parse(path.read_text())
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under if/try at module level run too; not those inside functions
        nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 for n in ast.walk(top)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph(top_level_only: bool = True) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, top_level_only) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_tree_is_read_whole():
    modules = _modules()
    assert len(modules) > 100 and "oodguard.serve.pipeline" in modules and "oodguard.queues.sqlite" in modules


def test_no_module_imports_itself_through_others():
    """At import time (the imports that run when a module loads), no circle between the project's modules."""
    assert _cycle(_graph(top_level_only=True)) is None


def test_the_cycle_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_serving_and_harvest_never_import_torch_and_harvest_never_imports_the_server():
    """Every import anywhere in a module counts here (also inside functions): what the gateway or a harvest
    could ever load."""
    modules = _modules()
    graph = _graph(top_level_only=False)
    for wing in ("oodguard.serve", "oodguard.harvest", "oodguard.queues"):
        for name in [m for m in modules if m == wing or m.startswith(wing + ".")]:
            reached = _reaches(graph, name) | {name}
            torch_users = sorted(m for m in reached if "torch" in _third_party(modules[m]))
            assert not torch_users, f"{name} reaches torch through {torch_users}"
            assert not any(m.startswith("oodguard.export") for m in reached), f"{name} reaches the export wing"
            if wing == "oodguard.harvest":
                assert "oodguard.serve.server" not in reached and "grpc" not in _third_party(modules[name])


def test_no_module_over_500_lines_outside_bench_and_the_generated_stubs():
    sources = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
               and p.relative_to(ROOT).parts[0] not in ("bench", "build", "runs")
               and p.parent != ROOT / "serve" / "v1"]
    assert len(sources) > 150
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long
