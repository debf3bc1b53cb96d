"""The package's structure: no import circle in torchpeer/ (imports inside functions included), the
core never imports the packages that build on it, and no module grows past 450 lines."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torchpeer")
MAX_LINES = 450
# README "Layout": ops -> layers -> lm -> cli; experiments, hf, parallel (and viz) build on the core
CORE = ("ops", "layers", "lm", "data", "optim", "diagnostics", "usage")
BUILT_ON_THE_CORE = ("cli", "experiments", "hf", "parallel", "viz")


def _modules() -> dict[str, str]:
    """{dotted module name: file} of every .py file of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: torchpeer modules it imports anywhere in its file}; ``from pkg import name`` counts as
    pkg.name when that is a module, else as pkg."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for a in node.names:
                    if f"{base}.{a.name}" in modules:
                        edges.add(f"{base}.{a.name}")
                    elif base in modules:
                        edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_checker_finds_a_circle():
    """Control: the search reports a planted circle (so a pass below means something)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "torchpeer.lm.checkpoint" in graph["torchpeer.lm.trainer"]  # imports are seen
    assert "torchpeer.lm.config_io" in graph["torchpeer.cli.data"]  # inside functions too


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("core", CORE)
def test_the_core_never_imports_what_builds_on_it(core):
    prefix = f"torchpeer.{core}"
    upward = {
        (name, dep)
        for name, deps in import_graph().items()
        # a package's __main__ is a script (python -m), which nothing imports: it may use the CLI
        if (name == prefix or name.startswith(prefix + ".")) and not name.endswith(".__main__")
        for dep in deps
        if dep.split(".")[1] in BUILT_ON_THE_CORE
    }
    assert not upward, sorted(upward)


def test_no_module_over_450_lines():
    long = {path: n for path in _modules().values() if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert not long, long
