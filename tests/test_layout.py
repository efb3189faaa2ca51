"""The package's folders are layers: each imports only from layers below it, and nothing imports in a cycle."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import calm_cli

# Lowest first. A module may import from its own folder and from any folder earlier in this list.
LAYERS = ["errors", "models", "io", "runtime", "eval", "bench", "training", "serve", "cli"]
ROOT = Path(calm_cli.__file__).parent


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(calm_cli.__path__, "calm_cli.") if not m.name.endswith("__main__"))


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(module: str) -> set[str]:
    """calm_cli modules that `module` imports, anywhere in its body (function-level imports count too)."""
    spec = importlib.util.find_spec(module)
    path = Path(spec.origin)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            if base and base.startswith("calm_cli"):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if importlib.util.find_spec(base) and _is_module(candidate) else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("calm_cli"))
    return found - {module}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def test_every_module_imports() -> None:
    """Every .py file in the package is a module the walk finds (no folder lacks its __init__), and each imports."""
    on_disk = {
        ".".join(("calm_cli", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for p in ROOT.rglob("*.py") if p.name != "__main__.py"
    }
    names = ["calm_cli", *modules()]
    assert set(names) == on_disk, on_disk ^ set(names)
    for name in names:
        assert importlib.import_module(name).__name__ == name


def test_every_folder_is_a_known_layer() -> None:
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"weights"}
    assert folders <= set(LAYERS), folders - set(LAYERS)


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Edges from a module to a module in a higher layer (calm_cli/__init__.py, the public API, may import anything)."""
    return [
        f"{a} -> {b}" for a, targets in graph.items() for b in targets
        if layer(a) and layer(b) and layer(a) != layer(b) and LAYERS.index(layer(b)) > LAYERS.index(layer(a))
    ]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None (depth-first search)."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def package_graph() -> dict[str, set[str]]:
    names = set(modules())
    return {name: imports_of(name) & names for name in names}


def test_imports_flow_downwards() -> None:
    wrong = upward(package_graph())
    assert not wrong, "imports that go up a layer:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    assert find_cycle(package_graph()) is None


def test_the_checks_can_fail() -> None:
    fake = {"calm_cli.models.a": {"calm_cli.io.b"}, "calm_cli.io.b": {"calm_cli.models.a"}}
    assert upward(fake) == ["calm_cli.models.a -> calm_cli.io.b"]
    assert find_cycle(fake) == ["calm_cli.io.b", "calm_cli.models.a", "calm_cli.io.b"]
    assert "calm_cli.io.checkpoint" in package_graph()["calm_cli.cli.model"]


def test_no_function_is_longer_than_100_lines() -> None:
    """A function that does not fit on a screen or two does more than one thing; split it."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100
    ]
    assert not long, long
