"""Flower shows each recording task's figures, through a real Flower process's HTTP API,
and the drain, which runs every second, does not bury them."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from sqlalchemy.engine import make_url

from tests.conftest import call, launch_stack, wait_until
from worker.ops.local_stack import LocalStack, free_port

FIGURES = {"group", "symbols", "messages", "messages_per_second", "reconnects"}


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, str]]:
    # A short busy timeout: the last test locks the database and wants the drain to fail soon.
    env = {"FLOWER_UNAUTHENTICATED_API": "true", "SQLITE_BUSY_TIMEOUT_MS": "300"}
    stack = launch_stack(tmp_path_factory.mktemp("flower"), env=env)
    try:
        url = stack.start_flower(free_port())
        wait_until(lambda: _get(url, "/api/workers"), 60, "Flower's API to answer")
        yield stack, url
    finally:
        stack.stop()


def _get(url: str, path: str, **params: Any) -> Any:
    try:
        response = requests.get(f"{url}{path}", params=params, timeout=5)
    except requests.ConnectionError:
        return None
    return response.json() if response.ok else None


def _recording_tasks(url: str) -> list[dict[str, Any]]:
    tasks = _get(url, "/api/tasks", taskname="tasks.stream_group") or {}
    return [t for t in tasks.values() if t["state"] == "PROGRESS" and (t.get("result") or {}).get("messages")]


def test_flower_serves_each_recording_tasks_figures(flower: tuple[LocalStack, str]) -> None:
    stack, url = flower
    subscribed = call(stack, "tasks.subscribe", ["BTCUSDT", "ETHUSDT"], ["trade"])

    task = wait_until(lambda: _recording_tasks(url), 60, "a stream_group task in PROGRESS with figures")[0]

    figures = task["result"]
    assert figures.keys() >= FIGURES
    assert figures["group"] == subscribed["groups"][0]
    assert figures["symbols"] == ["BTCUSDT", "ETHUSDT"]
    assert figures["messages"] > 0 and figures["messages_per_second"] > 0 and figures["reconnects"] == 0
    info = _get(url, f"/api/task/info/{task['uuid']}")
    assert info["state"] == "PROGRESS" and info["result"].keys() >= FIGURES


def test_the_drain_sends_no_task_events_so_flower_lists_none(flower: tuple[LocalStack, str]) -> None:
    stack, url = flower
    call(stack, "tasks.subscribe", ["BNBUSDT"], ["trade"])
    wait_until(lambda: _recording_tasks(url), 60, "a recording task in Flower")
    wait_until(lambda: call(stack, "tasks.status")["frames_drained"] > 0, 30, "the drain to run")

    # The ticks beat sends every second leave no rows that would bury the recording tasks.
    assert _get(url, "/api/tasks", taskname="tasks.drain") == {}
    assert _get(url, "/api/tasks", taskname="tasks.snapshot_books") == {}
    assert _get(url, "/api/tasks", taskname="tasks.supervise")  # other tasks still show


def test_a_drain_run_that_cannot_store_shows_in_flower_as_failed(flower: tuple[LocalStack, str]) -> None:
    """The drain's runs send no events, but a failed one does: Flower lists it, with the
    database's error, while the successful runs stay out of sight (the test above)."""
    stack, url = flower
    path = make_url(stack.env["DATABASE_URL"]).database
    assert path is not None
    blocker = sqlite3.connect(path, timeout=10)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        failed = wait_until(
            lambda: _get(url, "/api/tasks", taskname="tasks.drain", state="FAILURE"), 30, "a failed drain run in Flower"
        )
    finally:
        blocker.rollback()
        blocker.close()
    assert all("database is locked" in task["exception"] for task in failed.values())
    assert _get(url, "/api/tasks", taskname="tasks.drain", state="SUCCESS") == {}


def test_books_join_a_recording_tasks_figures_when_depth_streams_join_its_group(
    flower: tuple[LocalStack, str],
) -> None:
    """Depth streams subscribed into a running group (a live SUBSCRIBE, no new task):
    the task's figures in Flower gain their books, as the group's streams change."""
    stack, url = flower
    (group,) = call(stack, "tasks.subscribe", ["ADAUSDT"], ["trade"])["groups"]
    task = wait_until(
        lambda: [t for t in _recording_tasks(url) if t["result"]["group"] == group], 60, "the group's task in Flower"
    )[0]

    joined = call(stack, "tasks.subscribe", ["SOLUSDT", "XRPUSDT"], ["depth@100ms"])
    assert joined["groups"] == [group] and joined["new_groups"] == []

    def books_shown() -> dict[str, Any] | None:
        info = _get(url, f"/api/task/info/{task['uuid']}") or {}
        books = (info.get("result") or {}).get("books")
        return books if books and books.keys() == {"SOLUSDT", "XRPUSDT"} else None

    books = wait_until(books_shown, 60, "Flower's figures of the same task to show the new books")
    assert all(book["state"] in ("synced", "resyncing") for book in books.values())
