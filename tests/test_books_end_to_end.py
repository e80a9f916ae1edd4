"""Order books through the real stack: redis, celery worker and beat, the fake exchange.

Books are subscribed and rebuilt with the CLI as a user runs it, and compared level by
level with the fake's own book at the same update id (GET /fake/book), before and
after connections lose events (the fake's pause_data, a killed streams worker).
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery.result import AsyncResult
from sqlalchemy import text
from sqlalchemy.engine import Engine

from tests.conftest import call, fake_control, launch_stack, wait_until
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_stack import LocalStack
from worker.store.books import book_states
from worker.store.storage import make_engine

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
OTHER_STREAMS = ["depth20@100ms", "ticker_1h", "blockTrade", "referencePrice", "!miniTicker@arr"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("books"), fake_args=["--trades-per-second", "20"])
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def db(stack: LocalStack) -> Engine:
    return make_engine(stack.env["DATABASE_URL"])


def cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.ops.cli", *args], env=stack.env, capture_output=True, text=True, timeout=60
    )


def rows(db: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params)]


def states(stack: LocalStack) -> dict[str, str]:
    import redis

    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    return {symbol: book.state for symbol, book in book_states(client, RedisKeys("recorder")).items()}


def all_synced(stack: LocalStack) -> bool:
    return states(stack) == dict.fromkeys(SYMBOLS, "synced")


def fake_book(stack: LocalStack, symbol: str, update_id: int, levels: int) -> dict[str, Any]:
    answer = requests.get(
        f"{stack.env['BINANCE_REST_URL']}/fake/book", params={"symbol": symbol, "update_id": update_id}, timeout=5
    )
    assert answer.status_code == 200, answer.text
    book = answer.json()
    return {side: [[float(p), float(q)] for p, q in book[side][:levels]] for side in ("bids", "asks")}


def book_json(stack: LocalStack, symbol: str, at: str, levels: int = 20) -> dict[str, Any]:
    done = cli(stack, "book", symbol, "--at", at, "--levels", str(levels), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def known_book(stack: LocalStack, symbol: str, at: str, levels: int = 20) -> dict[str, Any] | None:
    """The book at `at` (`levels` per side, 0: all), None while that instant is before the first synced book."""
    done = cli(stack, "book", symbol, "--at", at, "--levels", str(levels), "--json")
    return json.loads(done.stdout) if done.returncode == 0 else None


def assert_equals_the_fakes(stack: LocalStack, book: dict[str, Any], levels: int = 20) -> None:
    expected = fake_book(stack, book["symbol"], book["update_id"], levels)
    assert len(book["bids"]) == len(book["asks"]) == levels
    assert {"bids": book["bids"], "asks": book["asks"]} == expected


def newest_event_time(db: Engine, symbol: str) -> int:
    return rows(db, "select max(event_time) from depth_updates where symbol = :s", s=symbol)[0][0]


def wait_for_events_after(db: Engine, symbol: str, moment_ms: int) -> None:
    wait_until(lambda: (newest_event_time(db, symbol) or 0) > moment_ms + 1000, 20, f"{symbol} events drained")


def test_subscribed_books_rebuild_equal_to_the_fakes(stack: LocalStack, db: Engine) -> None:
    done = cli(stack, "subscribe", *SYMBOLS, "--streams", "depth@100ms")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: all_synced(stack), 30, "both books synced from a snapshot")
    for symbol in SYMBOLS:
        book = wait_until(lambda s=symbol: known_book(stack, s, "-1s"), 20, f"{symbol}'s book known a second ago")
        assert_equals_the_fakes(stack, book)
        assert book["bids"][0][0] < book["asks"][0][0]
    text_form = cli(stack, "book", "BTCUSDT", "--at", "-1s", "--levels", "3")
    assert text_form.returncode == 0 and "BTCUSDT at " in text_form.stdout
    assert len(text_form.stdout.strip().splitlines()) == 2 + 3


def test_status_shows_each_books_state_last_update_id_and_rate(stack: LocalStack, db: Engine) -> None:
    done = cli(stack, "status", "--json")
    books = {book["symbol"]: book for book in json.loads(done.stdout)["books"]}
    assert set(books) == set(SYMBOLS)
    newest = rows(db, "select max(final_update_id) from depth_updates where symbol = 'BTCUSDT'")[0][0]
    assert books["BTCUSDT"]["state"] == "synced" and books["BTCUSDT"]["gap_since"] is None
    assert books["BTCUSDT"]["last_update_id"] >= newest - 100  # the drain may have moved on
    assert 5 <= books["BTCUSDT"]["updates_per_second"] <= 15  # depth@100ms: about 10 events a second
    text_form = cli(stack, "status").stdout
    assert "BOOK" in text_form and "synced" in text_form
    # What a caller of tasks.snapshot_books gets (a run that finds beat's run holding the
    # lock is skipped: ask again).
    result = wait_until(lambda: (r := call(stack, "tasks.snapshot_books")).get("books") and r, 30, "a snapshot run")
    assert {(b["symbol"], b["state"]) for b in result["books"]} == {(s, "synced") for s in SYMBOLS}
    # What Flower shows: the recording tasks' progress carries the books their streams feed.
    shown = wait_until(lambda: recording_tasks_books(stack), 20, "books in the recording tasks' progress")
    assert {symbol: book["state"] for symbol, book in shown.items()} == dict.fromkeys(SYMBOLS, "synced")
    # Reported every 5 s, so older than status's figures, but an update the drain stored.
    shown_id = shown["BTCUSDT"]["last_update_id"]
    query = "select count(*) from depth_updates where symbol = 'BTCUSDT' and final_update_id = :u"
    assert rows(db, query, u=shown_id) == [(1,)]


def recording_tasks_books(stack: LocalStack) -> dict[str, Any]:
    """The `books` of every recording task's PROGRESS figures (AsyncResult.info, which is
    the `result` Flower shows, see tests/test_flower.py), by symbol."""
    registry = GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys("recorder"))
    app = client_app(stack.env["REDIS_URL"])
    shown: dict[str, Any] = {}
    for gid in registry.wanted():
        info = AsyncResult(registry.status(gid).get("task_id", ""), app=app).info
        shown.update(info.get("books", {}) if isinstance(info, dict) else {})
    return shown


def test_a_time_before_the_first_snapshot_exits_1_naming_the_first_known_book(stack: LocalStack, db: Engine) -> None:
    first_event = rows(db, "select min(event_time) from depth_updates where symbol = 'BTCUSDT'")[0][0]
    done = cli(stack, "book", "BTCUSDT", "--at", str(first_event - 60_000))
    assert done.returncode == 1
    assert "before the first snapshot of BTCUSDT: the first known book is at" in done.stderr
    assert "Traceback" not in done.stderr
    never = cli(stack, "book", "SOLUSDT", "--at", "now")
    assert never.returncode == 1 and "no order book of SOLUSDT is recorded" in never.stderr


def test_lost_updates_make_a_gap_and_the_book_resyncs_equal_to_the_fakes(stack: LocalStack, db: Engine) -> None:
    before = book_json(stack, "ETHUSDT", "-1s")
    fake_control(stack, "pause_data", seconds=1.5)  # the updates of the pause are lost
    wait_until(
        lambda: rows(db, "select first_missing, last_missing from gaps where kind = 'depth' and symbol = 'ETHUSDT'"),
        20,
        "a depth gap recorded",
    )
    wait_until(lambda: all_synced(stack), 30, "both books synced again")
    [(gap_start, gap_end)] = rows(db, "select first_missing, last_missing from gaps where symbol = 'ETHUSDT'")
    assert gap_end - gap_start >= 1400
    inside = cli(stack, "book", "ETHUSDT", "--at", str((gap_start + gap_end) // 2))
    assert inside.returncode == 1
    assert "inside a gap of ETHUSDT's book" in inside.stderr and "it is known again from" in inside.stderr
    wait_for_events_after(db, "ETHUSDT", gap_end)
    assert_equals_the_fakes(stack, book_json(stack, "ETHUSDT", str(gap_end + 500)))
    assert_equals_the_fakes(stack, book_json(stack, "ETHUSDT", str(before["time"])))  # history is intact


def test_a_killed_streams_worker_leaves_a_gap_and_the_books_come_back(stack: LocalStack, db: Engine) -> None:
    gaps_before = rows(db, "select count(*) from gaps where kind = 'depth'")[0][0]
    stack.stop_process(stack.process("worker-streams"), signal.SIGKILL)
    killed_at = int(time.time() * 1000)
    stack.start_stream_worker(4, name="worker-streams-2")
    wait_until(
        lambda: rows(db, "select count(*) from gaps where kind = 'depth'")[0][0] >= gaps_before + len(SYMBOLS),
        60,
        "a depth gap per symbol after the kill",
    )
    for symbol in SYMBOLS:
        # Synced is not enough: "-1s" can still fall before the resync point (the first
        # event on the new snapshot), which is where the book is known again. Ask at an
        # instant after that point once the drain has stored events past it.
        known_again = wait_until(
            lambda s=symbol: (known := book_known_since(stack, db, s)) is not None and known > killed_at and known,
            30,
            f"{symbol}'s book synced again after the restart",
        )
        wait_for_events_after(db, symbol, known_again)
        assert_equals_the_fakes(stack, book_json(stack, symbol, str(known_again + 500), levels=50), levels=50)


def book_known_since(stack: LocalStack, db: Engine, symbol: str) -> int | None:
    """When the symbol's book was last resynced (ms), 0 if never broken since its start,
    None while it is unknown."""
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    if book_states(client, RedisKeys("recorder"))[symbol].state != "synced":
        return None
    query = f"select max(last_missing) from gaps where kind = 'depth' and symbol = '{symbol}'"
    return int(rows(db, query)[0][0] or 0)


def test_book_export_every_second_matches_the_fakes_books(stack: LocalStack, db: Engine, tmp_path: Path) -> None:
    # The tests before this one break the books on purpose: export a window the book
    # covers whole, one that starts after the last resync.
    wait_until(
        lambda: (known := book_known_since(stack, db, "BTCUSDT")) is not None and known < time.time() * 1000 - 9000,
        60,
        "BTCUSDT's book known for the last 9 s",
    )
    path = tmp_path / "btc-book.csv"
    done = cli(stack, "export", "BTCUSDT", "book", "--start", "-8s", "--end", "-1s", "--step", "1s", "--levels", "10",
               "-o", str(path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    with path.open() as file:
        exported = list(csv.DictReader(file))
    assert 3 <= len(exported) <= 7
    assert list(exported[0])[:4] == ["time", "update_id", "bid_price_1", "bid_qty_1"]
    for row in exported:
        expected = fake_book(stack, "BTCUSDT", int(row["update_id"]), 10)
        for side, prefix in (("bids", "bid"), ("asks", "ask")):
            got = [[float(row[f"{prefix}_price_{n}"]), float(row[f"{prefix}_qty_{n}"])] for n in range(1, 11)]
            assert got == expected[side]


def test_partial_depth_and_the_2026_streams_land_in_their_tables(stack: LocalStack, db: Engine) -> None:
    done = cli(stack, "subscribe", "ETHUSDT", "--streams", ",".join(OTHER_STREAMS))
    assert done.returncode == 0, done.stderr
    for table in ("partial_depth", "window_tickers", "block_trades", "reference_prices", "mini_tickers"):
        wait_until(lambda t=table: rows(db, f"select count(*) from {t}")[0][0], 30, f"rows in {table}")  # type: ignore[misc]
    from worker.store.depth import unpack_levels

    [(update_id, bids, asks, received_at)] = rows(
        db, "select last_update_id, bids, asks, received_at from partial_depth where symbol = 'ETHUSDT' limit 1"
    )
    expected = fake_book(stack, "ETHUSDT", update_id, 20)
    assert [list(level) for level in unpack_levels(bids)] == expected["bids"]
    assert [list(level) for level in unpack_levels(asks)] == expected["asks"]
    assert received_at is not None
    assert rows(db, "select distinct window from window_tickers") == [("1h",)]


def test_an_all_market_stream_is_unsubscribed_by_its_name(stack: LocalStack) -> None:
    registry = GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys("recorder"))
    before = registry.covered_streams()
    assert "!miniTicker@arr" in before
    done = cli(stack, "unsubscribe", "!miniTicker@arr")
    assert done.returncode == 0, done.stderr
    assert registry.covered_streams() == before - {"!miniTicker@arr"}


def test_dropped_connections_on_the_one_second_stream_leave_a_gap_and_resync(stack: LocalStack, db: Engine) -> None:
    done = cli(stack, "subscribe", "SOLUSDT", "--streams", "depth")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: states(stack).get("SOLUSDT") == "synced", 30, "SOLUSDT synced")
    count_gaps = "select count(*) from gaps where kind = 'depth' and symbol = 'SOLUSDT'"
    assert rows(db, count_gaps) == [(0,)]
    fake_control(stack, "drop_all")  # every connection aborted: the ingest reconnects
    dropped_at = int(time.time() * 1000)
    wait_until(lambda: rows(db, count_gaps)[0][0] == 1, 30, "a SOLUSDT gap after the drop")
    wait_until(lambda: states(stack).get("SOLUSDT") == "synced", 30, "SOLUSDT synced again")
    wait_for_events_after(db, "SOLUSDT", dropped_at + 2000)
    book = book_json(stack, "SOLUSDT", "-1s")
    assert book["time"] > dropped_at
    assert_equals_the_fakes(stack, book)
    events = rows(db, "select first_update_id, final_update_id from depth_updates where symbol = 'SOLUSDT'")
    assert sum(final - first + 1 for first, final in events) / len(events) > 3  # 1 s events cover many ids
