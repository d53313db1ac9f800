"""Dependencies point one way: the offline path and the online service (api) both build on
model, index and store, and never on each other; nothing below api imports a web framework."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
FORBIDDEN = {
    "model": ("service.offline", "service.index", "service.api", "fastapi", "starlette"),
    "index": ("service.offline", "service.api", "fastapi", "starlette"),
    "offline": ("service.api", "service.index", "fastapi", "starlette"),
    "store": ("service.offline", "service.model", "service.index", "service.api", "fastapi"),
    "api": ("service.offline",),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _imported_modules(path: Path) -> set[str]:
    """What ``path`` imports, ``from package import module`` naming the module too."""
    names = _imports(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    files = sorted((SERVICE / package).rglob("*.py"))
    assert files, f"no modules found in service/{package}"
    bad = {
        f"{f.relative_to(SERVICE)} imports {name}"
        for f in files
        for name in _imports(f)
        if name.startswith(FORBIDDEN[package])
    }
    assert bad == set()


# The offline path in layers: each imports only the layers before it (cli.py and bootstrap.py,
# on top, may import any).
OFFLINE_LAYERS = ("data", "evaluation", "training", "experiments")


@pytest.mark.parametrize("layer", OFFLINE_LAYERS)
def test_offline_layers_import_only_the_layers_below(layer: str) -> None:
    above = OFFLINE_LAYERS[OFFLINE_LAYERS.index(layer) + 1 :]
    files = sorted((SERVICE / "offline" / layer).rglob("*.py"))
    assert len(files) > 1, f"no modules found in service/offline/{layer}"
    bad = {
        f"{f.relative_to(SERVICE)} imports {name}"
        for f in files
        for name in _imports(f)
        if name.startswith(tuple(f"service.offline.{a}" for a in above))
    }
    assert bad == set()


def test_no_import_circles_in_the_service() -> None:
    """Not even through an import made inside a function or for type checking only."""
    modules = {
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
        for f in SERVICE.rglob("*.py")
    }
    graph = {
        m: {n for n in _imported_modules(f) if n in modules and n != m} for m, f in modules.items()
    }
    done: set[str] = set()

    def circle_from(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for name in sorted(graph[module]):
            found = circle_from(name, [*path, module])
            if found:
                return found
        done.add(module)
        return None

    circles = [c for m in sorted(graph) if (c := circle_from(m, []))]
    assert circles == []


ROOT = SERVICE.parent
# The harness (real processes on loopback) is shared by tests and benchmarks, which do not
# import each other; tests may import a benchmark only to test the benchmark itself.
SHARED = {
    "service": ("harness", "tests", "benchmarks"),
    "harness": ("tests", "benchmarks"),
    "benchmarks": ("tests",),
}
TESTED_BENCHMARKS = {
    "test_pooling_probe.py": "benchmarks.pooling_probe",
    "test_ab_simulation.py": "benchmarks.ab_simulation",
}


@pytest.mark.parametrize("folder", sorted(SHARED))
def test_tests_and_benchmarks_share_the_harness_not_each_other(folder: str) -> None:
    bad = {
        f"{f.relative_to(ROOT)} imports {name}"
        for f in sorted((ROOT / folder).rglob("*.py"))
        for name in _imports(f)
        if name.split(".")[0] in SHARED[folder]
    }
    assert bad == set()
    tests_of_benchmarks = {
        f"{f.name} imports {name}"
        for f in sorted((ROOT / "tests").glob("*.py"))
        for name in _imports(f)
        if name.split(".")[0] == "benchmarks" and TESTED_BENCHMARKS.get(f.name) != name
    }
    assert tests_of_benchmarks == set()


MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60


def test_no_file_or_function_in_the_service_outgrows_one_reading() -> None:
    """The house's size limits (issue 23): a file a newcomer can read through, a function
    that fits on a screen (docstring included)."""
    long_files, long_functions = [], []
    for path in sorted(SERVICE.rglob("*.py")):
        source = path.read_text()
        where = path.relative_to(SERVICE.parent)
        if len(source.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{where}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert (long_files, long_functions) == ([], [])
