"""`imagenets_hf.evaluation` imports one way: no module of the package imports, even lazily inside a function, a
module that imports it back (directly or through others). Read from the source with `ast`, so a new import is
checked without anyone listing it here."""

import ast
from pathlib import Path

import imagenets_hf.evaluation

PACKAGE = "imagenets_hf.evaluation"
PACKAGE_DIR = Path(imagenets_hf.evaluation.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def imported_modules(source: str, name: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The `modules` that module `name` (source text `source`) imports anywhere in its body (`from . import x`,
    `from .x import y`, `import imagenets_hf.evaluation.x`, `from imagenets_hf.evaluation import x`)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import name`: the submodule `name` when there is one, else the package itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` also imports a.b: the longest known prefix is the module that is run.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {
        module_name(path): imported_modules(
            path.read_text(encoding="utf-8"), module_name(path), modules, path.name == "__init__.py"
        )
        for path in paths
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with an explicit path)."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_reads_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    modules = {PACKAGE, f"{PACKAGE}.x", f"{PACKAGE}.metrics", f"{PACKAGE}.report", f"{PACKAGE}.run"}
    source = (
        "import os\nfrom imagenets_hf.evaluation import METRIC_PATH\n"
        "def f():\n    from .metrics import A\n    from . import report\n    import imagenets_hf.evaluation.run\n"
    )
    assert imported_modules(source, f"{PACKAGE}.x", modules) == {PACKAGE, *modules - {PACKAGE, f"{PACKAGE}.x"}}
    # In a package's __init__, "." is the package itself.
    assert imported_modules("from .metrics import A", PACKAGE, modules, is_package=True) == {f"{PACKAGE}.metrics"}


def test_the_evaluation_package_imports_one_way():
    graph = import_graph()
    # The graph was read: the scripts' module imports prediction and submissions, prediction the inference core.
    assert {f"{PACKAGE}.predict", f"{PACKAGE}.submission"} <= graph[f"{PACKAGE}.run"]
    assert f"{PACKAGE}.inference" in graph[f"{PACKAGE}.predict"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in imagenets_hf/evaluation: " + " -> ".join(cycle)
