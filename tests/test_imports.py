"""The package's import graph has no cycles: a module never reaches back into one that imports it.

Every `import` counts, those inside functions included (a lazy import is still a dependency, only a
hidden one), so a method cannot import the loop that calls it.
"""

import ast
import os

import pytest

PACKAGE = "incremental"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def package_modules() -> dict[str, str]:
    """{module name: file path} for every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[module_name(path)] = path
    return found


def imported(path: str, name: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that the module at `path` imports, anywhere in its body."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from pkg import mod` imports the module `pkg.mod` when there is one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names
            ]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph = {name: imported(path, name, modules) for name, path in modules.items()}
    # Importing `a.b` runs `a/__init__.py` first, but that is not an edge of `a.b`'s own: a
    # package's __init__ importing its submodules is not a cycle with them.
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_methods_do_not_import_the_loop():
    graph = import_graph()
    loop = {f"{PACKAGE}.run", f"{PACKAGE}.seeds", f"{PACKAGE}.train"} | {
        m for m in graph if m.startswith(f"{PACKAGE}.phase")
    }
    for name, deps in graph.items():
        if name.startswith(f"{PACKAGE}.methods"):
            assert not deps & loop, f"{name} imports the loop: {sorted(deps & loop)}"


@pytest.mark.parametrize(
    "graph, has_cycle",
    [({"a": {"b"}, "b": {"c"}, "c": set()}, False), ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True)],
)
def test_the_cycle_finder_finds_cycles(graph, has_cycle):
    assert (find_cycle(graph) is not None) == has_cycle


if __name__ == "__main__":  # print the graph, one module a line
    for mod, deps in sorted(import_graph().items()):
        print(f"{mod} -> {', '.join(sorted(d.removeprefix(PACKAGE + '.') for d in deps))}")


def test_heavy_libraries_load_only_when_a_run_needs_them():
    """`incremental.run` (what every run imports) leaves out what only some runs use: tfds and
    TensorFlow (tfds data), grain (streaming), matplotlib (the plot), scikit-learn (digits), Pillow
    (image folders)."""
    import subprocess
    import sys

    code = (
        "import sys, incremental.run; "
        "print(sorted(m for m in ('tensorflow_datasets', 'tensorflow', 'grain', 'matplotlib', "
        "'sklearn', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
