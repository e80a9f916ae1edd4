"""The layering docs/layout.md promises, checked on the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules_under(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", modules_under("worker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_in_worker_imports_tasks(path: Path) -> None:
    assert not {m for m in imported_modules(path) if m == "tasks" or m.startswith("tasks.")}


@pytest.mark.parametrize("path", modules_under("worker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_in_worker_imports_the_fake_exchange(path: Path) -> None:
    """The product serves Binance's conventions from its own modules; the fake imports them, not the reverse."""
    assert not {m for m in imported_modules(path) if m == "fake_binance" or m.startswith("fake_binance.")}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [("worker/ingest", "worker.store"), ("worker/store", "worker.ingest")],
)
def test_ingest_and_store_meet_only_at_the_buffer(layer: str, forbidden: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith(forbidden))
        for path in modules_under(layer)
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_worker_holds_at_most_ten_modules_directly() -> None:
    assert len(list((ROOT / "worker").glob("*.py"))) <= 10


def test_tasks_are_thin_wrappers() -> None:
    """tasks/ holds task definitions and connections only: no module grows machinery."""
    too_long = {p.name: len(p.read_text().splitlines()) for p in modules_under("tasks")}
    assert {name: lines for name, lines in too_long.items() if lines > 130} == {}
