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


ROOT = SERVICE.parent
# The harness (real processes on loopback) is shared by tests and benchmarks, which do not
# import each other; tests may import a benchmark only to test the benchmark itself.
SHARED = {
    "service": ("harness", "tests", "benchmarks"),
    "harness": ("tests", "benchmarks"),
    "benchmarks": ("tests",),
}
TESTED_BENCHMARKS = {"test_pooling_probe.py": "benchmarks.pooling_probe"}


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
