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
