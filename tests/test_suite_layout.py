"""The suite's own layout (README, "Tests"): every folder is a package, every module of
tests/fixtures/ that defines fixtures is registered once in tests/conftest.py, and no test module
imports another or re-registers a shared fixture by importing it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests import conftest

TESTS = Path(__file__).resolve().parent


def _modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _fixtures_of(path: Path) -> list[str]:
    return [
        node.name
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef)
        and any("fixture" in ast.unparse(d) for d in node.decorator_list)
    ]


def test_every_folder_is_a_package() -> None:
    folders = {p.parent for p in _modules()}
    assert sorted(str(f) for f in folders if not (f / "__init__.py").exists()) == []


def test_every_fixture_module_is_registered_once() -> None:
    defining = sorted(
        f"tests.fixtures.{p.stem}" for p in (TESTS / "fixtures").glob("*.py") if _fixtures_of(p)
    )
    assert sorted(conftest.pytest_plugins) == defining
    assert len(set(conftest.pytest_plugins)) == len(conftest.pytest_plugins)


def test_no_test_module_imports_another_or_a_fixture() -> None:
    fixtures = {
        f"tests.fixtures.{p.stem}.{name}"
        for p in (TESTS / "fixtures").glob("*.py")
        for name in _fixtures_of(p)
    }
    assert fixtures, "no shared fixtures found"
    wrong = {
        str(path.relative_to(TESTS)): sorted(
            name
            for name in _imported(path)
            if name in fixtures or any(part.startswith("test_") for part in name.split("."))
        )
        for path in _modules()
    }
    assert {path: names for path, names in wrong.items() if names} == {}
