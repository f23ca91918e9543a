"""The package's layering (docs/architecture.md): no import cycles, thin CLIs that do not import each other.

The graph counts every import, function-level ones included: a cycle hidden inside a function still
makes two modules one unit that cannot be understood, tested or moved apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mistral_ft"
CLI_MODULES = {"mistral_ft.train", "mistral_ft.validate", "mistral_ft.export", "mistral_ft.generate", "mistral_ft.convert",
               "mistral_ft.evaluate", "mistral_ft.__main__"}  # __main__: the `mistral-ft` dispatcher (importlib)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports (absolute and relative, at any depth of the file)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                # the deepest package module that the name refers to (a submodule, or the module defining it)
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("mistral_ft"):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    # `import mistral_ft.x.y` runs mistral_ft/__init__ and mistral_ft/x/__init__ first; those re-export
    # downward only, so an edge *to* a package __init__ from inside it is not a cycle of ideas
    return {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(_without_package_inits(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cli_modules_do_not_import_each_other():
    graph = import_graph()
    bad = sorted((m, n) for m in CLI_MODULES for n in graph.get(m, ()) if n in CLI_MODULES)
    assert not bad, f"a CLI module imports another CLI module: {bad}"


def test_nothing_below_the_clis_imports_a_cli():
    graph = import_graph()
    bad = sorted((m, n) for m, deps in graph.items() if m not in CLI_MODULES for n in deps if n in CLI_MODULES)
    assert not bad, f"library code imports a CLI module: {bad}"


@pytest.mark.parametrize("lower, upper", [("mistral_ft.distributed", "mistral_ft.training"),
                                          ("mistral_ft.model", "mistral_ft.training"),
                                          ("mistral_ft.model", "mistral_ft.runs"),
                                          ("mistral_ft.errors", "mistral_ft.")])
def test_layers_import_only_downward(lower, upper):
    graph = import_graph()
    bad = sorted((m, n) for m, deps in graph.items() if m == lower or m.startswith(lower + ".")
                 for n in deps if n.startswith(upper) and n != lower)
    assert not bad, f"{lower} imports {upper}: {bad}"


def test_cli_modules_are_thin():
    sizes = {m: len((PACKAGE.parent / (m.replace(".", "/") + ".py")).read_text().splitlines()) for m in CLI_MODULES}
    assert max(sizes.values()) <= 250, sizes
