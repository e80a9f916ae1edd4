"""End to end with real processes: redis-server, the fake exchange, `celery -A worker
worker` (both queues), `celery -A worker beat`, and a client process calling
`subscribe.delay(...)` exactly as the README shows. Assertions are on the SQLite file,
and for the main path also on a real PostgreSQL server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from tests.conftest import call, clean_env, fake_stats, launch_stack, status_command, wait_until
from worker.groups import GroupRegistry
from worker.keys import RedisKeys
from worker.ops.clients import client_app
from worker.ops.local_postgres import PostgresServer
from worker.ops.local_stack import CELERY, LocalStack
from worker.store.storage import TABLES, make_engine

SYMBOLS = ["BTCUSDT", "ETHUSDT"]
STREAMS = ["trade", "aggTrade", "ticker", "miniTicker", "bookTicker", "avgPrice", "kline_1s", "kline_1m"]
RECORD_SECONDS = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = launch_stack(tmp_path_factory.mktemp("e2e"), fake_args=["--trades-per-second", "25"])
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def db(stack: LocalStack) -> Engine:
    return make_engine(stack.env["DATABASE_URL"])


@pytest.fixture(scope="module")
def postgres_stack(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[LocalStack]:
    """The same stack storing into a database of a real PostgreSQL server."""
    env = {"DATABASE_URL": postgres_server.create_database()}
    stack = launch_stack(tmp_path_factory.mktemp("e2e-pg"), fake_args=["--trades-per-second", "25"], env=env)
    yield stack
    stack.stop()


def scalar(db: Engine, sql: str, **params: object) -> object:
    with db.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def subscribe_like_the_readme(stack: LocalStack, symbols: list[str], streams: list[str]) -> dict:
    """Another application's process: imports `tasks` and calls `subscribe.delay`."""
    code = (
        "import json, sys; from tasks import subscribe; "
        f"print(json.dumps(subscribe.delay({symbols!r}, streams={streams!r}).get(timeout=60)))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=stack.env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def id_summary(db: Engine, table: str, id_column: str, symbol: str) -> tuple[int, int, int, int]:
    with db.connect() as conn:
        row = conn.execute(
            text(
                f"select count(*), count(distinct {id_column}), min({id_column}), max({id_column}) "
                f"from {table} where symbol = :s"
            ),
            {"s": symbol},
        ).one()
    return tuple(row)  # type: ignore[return-value]


def test_every_trade_sent_in_the_window_is_stored_exactly_once(stack: LocalStack, db: Engine) -> None:
    record_and_check_every_trade(stack, db)


def test_every_trade_sent_in_the_window_is_stored_exactly_once_in_postgresql(postgres_stack: LocalStack) -> None:
    db = make_engine(postgres_stack.env["DATABASE_URL"])
    assert db.dialect.name == "postgresql"
    record_and_check_every_trade(postgres_stack, db)


def record_and_check_every_trade(stack: LocalStack, db: Engine) -> None:
    """Subscribe as the README shows, record, unsubscribe: every trade and aggregate
    trade the fake sent is stored exactly once, and the task and `status` report it."""
    result = subscribe_like_the_readme(stack, ["btcusdt", "ETHUSDT"], STREAMS)
    assert result["symbols"] == {"BTCUSDT": "TRADING", "ETHUSDT": "TRADING"}
    assert len(result["groups"]) == 1 and result["new_groups"] == result["groups"]

    again = call(stack, "tasks.subscribe", SYMBOLS, streams=STREAMS)
    assert again["groups"] == result["groups"] and again["new_groups"] == []

    wait_until(lambda: (scalar(db, "select count(*) from trades") or 0) > 0, 30, "the first trades in the database")
    time.sleep(RECORD_SECONDS)
    assert_task_reports_progress(stack, result["groups"][0])
    assert_status_command_says_healthy(stack, result["groups"][0])
    call(stack, "tasks.unsubscribe", SYMBOLS)
    wait_until(lambda: fake_stats(stack)["connections"]["open"] == 0, 15, "the connection to close")
    stats = fake_stats(stack)
    assert max(stats["connections"]["max_open_per_streamset"].values()) == 1

    for symbol in SYMBOLS:
        for kind, table, id_column in (("trade", "trades", "trade_id"), ("aggTrade", "agg_trades", "agg_id")):
            sent = stats["sent"][symbol][kind]
            expected = (sent["count"], sent["count"], sent["first"], sent["last"])
            wait_until(
                lambda: id_summary(db, table, id_column, symbol) == expected,  # noqa: B023 (awaited here)
                20,
                f"{symbol} {table} to match what the fake sent: {expected}",
            )
            assert sent["last"] - sent["first"] + 1 == sent["count"] >= RECORD_SECONDS * 20


def assert_task_reports_progress(stack: LocalStack, gid: str) -> None:
    """The running task's state is PROGRESS with counts, as Flower and AsyncResult see it."""
    status = GroupRegistry(redis.Redis.from_url(stack.env["REDIS_URL"]), RedisKeys("recorder")).status(gid)
    running = AsyncResult(status["task_id"], app=client_app(stack.env["REDIS_URL"]))
    assert running.state == "PROGRESS"
    assert running.info["group"] == gid and running.info["connected"] is True
    assert running.info["messages"] > 0 and running.info["messages_per_second"] > 0
    assert float(status["messages_per_second"]) > 0


def assert_status_command_says_healthy(stack: LocalStack, gid: str) -> None:
    shown = status_command(stack)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.rstrip().endswith("status: healthy")
    group_line = next(line for line in shown.stdout.splitlines() if line.startswith(gid))
    assert "BTCUSDT,ETHUSDT" in group_line and "connected" in group_line
    assert re.search(r"^drains: lane 0 by \d+@default@", shown.stdout, re.MULTILINE)  # one group: one lane
    snapshot = json.loads(status_command(stack, "--json").stdout)
    assert snapshot["healthy"] is True and snapshot["problems"] == []
    assert [drain["lane"] for drain in snapshot["drains"]] == [0]
    assert snapshot["tables"]["trades"]["rows"] > 0


def test_every_stream_kind_lands_in_its_table(stack: LocalStack, db: Engine) -> None:
    # Runs after the trade test on the same stack: its recording window filled every table.
    for table in ("tickers", "mini_tickers", "book_tickers", "avg_prices", "klines"):
        symbols = {row[0] for row in _rows(db, f"select distinct symbol from {table}")}
        assert symbols == set(SYMBOLS), table
    for table in TABLES:  # every row from the websocket carries the receive time of its flush
        assert _rows(db, f"select count(*) from {table} where received_at is null") == [(0,)], table
    intervals = {row[0] for row in _rows(db, "select distinct interval from klines")}
    assert intervals == {"1s", "1m"}
    closed = _rows(db, "select open_time, close_time from klines where interval = '1s' and is_closed")
    assert closed and all(close - open_ == 999 for open_, close in closed)
    assert scalar(db, "select count(*) from market_data") == scalar(db, "select count(*) from trades")
    assert scalar(db, "select count(*) from market_data where price is null or timestamp is null") == 0


def _rows(db: Engine, sql: str) -> list[tuple]:
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql))]


def test_an_unknown_symbol_is_refused_with_binances_message_and_the_symbol_named(stack: LocalStack) -> None:
    with pytest.raises(Exception) as raised:
        call(stack, "tasks.subscribe", ["BTCUSDT", "NOTACOIN"])
    assert "NOTACOIN" in str(raised.value) and "Invalid symbol." in str(raised.value)
    assert not isinstance(raised.value, CeleryTimeout)


def test_an_unknown_stream_kind_is_refused_with_the_valid_kinds_listed(stack: LocalStack) -> None:
    with pytest.raises(Exception) as raised:
        call(stack, "tasks.subscribe", ["BTCUSDT"], streams=["trades"])
    assert "unknown stream kind 'trades'" in str(raised.value)
    assert "aggTrade" in str(raised.value)


def test_a_plain_celery_worker_consumes_both_queues(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The contract `celery -A worker worker` (no -Q) records on its own, with beat."""
    stack = LocalStack(tmp_path_factory.mktemp("plain"), env=clean_env())
    try:
        stack.start_redis()
        stack.start_fake_exchange()
        stack.spawn("worker", [*CELERY, "worker", "-c", "3", "-l", "INFO"])
        stack.start_beat()
        stack.wait_for_workers(["worker"])
        db = make_engine(stack.env["DATABASE_URL"])
        call(stack, "tasks.subscribe", ["BNBUSDT"], streams=["trade"])

        # The worker creates the tables: none may exist yet at the first looks.
        def stored() -> int:
            return int(scalar(db, "select count(*) from trades") or 0) if inspect(db).has_table("trades") else 0

        wait_until(lambda: stored() >= 20, 30, "trades from a plain worker")
    finally:
        stack.stop()
